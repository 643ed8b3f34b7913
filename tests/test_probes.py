"""Linear probes: trained on a tiny backbone's output, saved as safetensors + json with metrics,
read back identically; targets per patch come from the masks."""

import json

import numpy as np
import pytest
import torch

from saev_core.probes import (
    LinearProbe,
    ProbeConfig,
    fit_probe,
    load_probe,
    miou,
    patch_targets,
    segmentation_classes,
    train_probes,
)


def test_train_save_and_load(tiny_vit, tiny_world, tmp_path):
    cfg = ProbeConfig(
        model=str(tiny_vit),
        data=str(tiny_world),
        out_dir=str(tmp_path / "probes"),
        seg_classes=("red", "green", "blue", "yellow"),
        epochs=3,
    )
    metrics = train_probes(cfg)
    assert set(metrics) == {"classification", "segmentation"}
    for task in ("classification", "segmentation"):
        d = tmp_path / "probes" / task
        assert sorted(p.name for p in d.iterdir()) == ["probe.json", "probe.safetensors"]
        meta = json.loads((d / "probe.json").read_text())
        assert meta["task"] == task and meta["metrics"] == json.loads(json.dumps(metrics[task]))
    probe, meta = load_probe(tmp_path / "probes" / "segmentation")
    assert probe.classes == ["background", "red", "green", "blue", "yellow"]
    assert 0 <= metrics["segmentation"]["miou"] <= 1
    h = torch.randn(2, 17, 32)
    assert probe.probs(h).shape == (2, 16, 5)
    cls, _ = load_probe(tmp_path / "probes" / "classification")
    assert cls.probs(h).shape == (2, len(cls.classes))


def test_patch_targets_follow_the_masks(tiny_world):
    from saev_core.data import load_records, open_mask

    rec = load_records(tiny_world, ["train"])[0]
    classes = segmentation_classes([rec], ("red", "green", "blue", "yellow"))
    t = patch_targets(rec, classes, (4, 4), (32, 32))
    mask = open_mask(rec)
    # every patch whose 8x8 pixels are all one object gets that object's colour
    for p in range(16):
        block = mask[(p // 4) * 8 : (p // 4 + 1) * 8, (p % 4) * 8 : (p % 4 + 1) * 8]
        if (block == block.flat[0]).all():
            v = int(block.flat[0])
            want = 0 if v == 0 else classes.index(rec.mask_labels[v][0])
            assert t[p] == want
    with pytest.raises(ValueError, match="several segmentation classes"):
        patch_targets(rec, segmentation_classes([rec]), (4, 4), (32, 32))  # colour and shape


def test_fit_separable_problem_and_miou():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 5, 8, generator=g)
    y = (h[:, 0, :2] > 0).float()  # two labels, each one CLS coordinate's sign, with a margin
    h[:, 0, :2] += torch.sign(h[:, 0, :2]) * 0.5
    probe = LinearProbe(8, ["a", "b"], "classification", "cls", 1)
    fit_probe(probe, h, y, ProbeConfig(epochs=200, lr=0.05))
    with torch.no_grad():
        acc = ((probe.probs(h) > 0.5).float() == y).float().mean()
    assert acc == 1.0
    m, iou = miou(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert iou == [1.0, 0.5, 0.5] and m == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="tasks"):
        ProbeConfig(tasks=("depth",))
