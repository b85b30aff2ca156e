"""The shipped Fashion-MNIST classifier extractor: file identity, accuracy on real data, Fréchet distances."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fewstep.data.base import u8_to_float
from fewstep.metrics import FeatureStats, frechet_distance, make_extractor
from fewstep.files import sha256_of
from fewstep.metrics.classifier import (WEIGHTS, ClassifierWeightsError, FashionClassifierExtractor,
                                        load_classifier, record_path)
from fewstep.registry import extractors

REAL = "/usr/share/datasets/fashion-mnist"


def real_test_split():
    from fewstep.data.fashion_mnist import FashionMNIST, SYSTEM_DIR

    if not SYSTEM_DIR.is_dir():
        pytest.skip(f"real Fashion-MNIST files not installed at {REAL} (apt-get install dataset-fashion-mnist)")
    return FashionMNIST(SYSTEM_DIR, "test")


def test_shipped_weights_match_their_record():
    record = json.loads(record_path(WEIGHTS).read_text())
    assert sha256_of(WEIGHTS) == record["sha256"]
    assert WEIGHTS.stat().st_size == record["bytes"] < 2 * 2**20
    assert record["feature_dim"] == 128 and record["test_accuracy"] >= 0.90
    ex = make_extractor("fmnist-classifier")
    assert extractors.get("fmnist-classifier") is FashionClassifierExtractor
    assert ex.metadata() == {"extractor": "fmnist-classifier", "weights_sha256": record["sha256"], "resize": "none",
                             "input_size": 32, "feature_dim": 128}


def test_a_changed_weights_file_is_refused(tmp_path):
    copy = tmp_path / WEIGHTS.name
    shutil.copyfile(WEIGHTS, copy)
    shutil.copyfile(record_path(WEIGHTS), record_path(copy))
    load_classifier(copy)                                   # the intact copy loads
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0x01                                        # one flipped bit in the last weight
    copy.write_bytes(bytes(data))
    with pytest.raises(ClassifierWeightsError, match="has SHA-256 .* but .* records"):
        FashionClassifierExtractor(path=copy)
    record_path(copy).unlink()
    with pytest.raises(ClassifierWeightsError, match="is missing"):
        load_classifier(copy)


def test_accuracy_on_real_test_images_matches_the_record():
    # 1000 images (every 10th of the test split). Their accuracy estimates the recorded 10 000-image one
    # with a binomial standard error √(p(1−p)/1000) ≈ 0.85 %, so the tolerance is 3 standard errors; a
    # wrong pixel range or padding would cost tens of points. The full split is checked in the slow test.
    test = real_test_split()
    net, record = load_classifier()
    idx = torch.arange(0, 10000, 10)
    with torch.no_grad():
        acc = float((net(u8_to_float(test.images[idx])).argmax(1) == test.labels[idx]).float().mean())
    p = record["test_accuracy"]
    assert abs(acc - p) <= 3 * math.sqrt(p * (1 - p) / len(idx)), (acc, p)


@pytest.mark.slow
def test_accuracy_on_the_whole_real_test_split_is_the_recorded_one():
    test = real_test_split()
    net, record = load_classifier()
    with torch.no_grad():
        correct = sum(int((net(u8_to_float(test.images[i:i + 1000])).argmax(1) == test.labels[i:i + 1000]).sum())
                      for i in range(0, len(test), 1000))
    assert abs(correct / len(test) - record["test_accuracy"]) < 0.01


def test_features_take_the_toolkits_pixels_and_give_frechet_distances():
    ex = make_extractor("fmnist-classifier")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 32, 32), generator=gen, dtype=torch.uint8)
    assert torch.equal(ex.preprocess(images), u8_to_float(images))     # the training data's [−1, 1] range
    features = ex(images)
    assert features.shape == (300, 128) and features.dtype == torch.float32 and (features >= 0).all()
    stats = FeatureStats(128)
    stats.update(features)
    mu, sigma = stats.mean(), stats.cov()
    scale = float(sigma.trace())
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * scale          # FD of a set with itself ≈ 0
    other = FeatureStats(128)
    other.update(ex(torch.zeros(300, 1, 32, 32, dtype=torch.uint8) + torch.randint(0, 30, (300, 1, 32, 32),
                                                                                   generator=gen, dtype=torch.uint8)))
    assert frechet_distance(mu, sigma, other.mean(), other.cov()) > 0.1 * scale   # and far from a different set
    with pytest.raises(ValueError, match="1×32×32 grey images"):
        ex(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
