"""SSD anchors, box coding and matching (mvit2_jax.models.anchors) against the official numbers
(../shared/reference/downstream.md section 3) and NumPy loops written from the official definitions."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvit2_jax.models import anchors as A


def anchors_loop(height, width):
    """The anchors cell by cell, as the official generator's loop builds them."""
    scales = np.linspace(0.1, 1.05, 7)
    out = []
    for k, ((h, w), ratios) in enumerate(zip(A.feature_map_sizes(height, width), A.ASPECT_RATIOS)):
        small, big = scales[k], math.sqrt(scales[k] * scales[k + 1])
        for y, x in itertools.product(range(h), range(w)):
            cx, cy = (x + 0.5) / w, (y + 0.5) / h
            out += [[cx, cy, small, small], [cx, cy, big, big]]
            for r in ratios:
                s = math.sqrt(r)
                out += [[cx, cy, small * s, small / s], [cx, cy, small / s, small * s]]
    return np.clip(np.asarray(out), 0.0, 1.0)


def test_anchor_count_and_layout_at_320_are_the_official_ones():
    assert A.feature_map_sizes(320, 320) == ((20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1))
    assert [A.anchors_per_cell(r) for r in A.ASPECT_RATIOS] == [6, 6, 6, 6, 6, 4]
    anchors = A.ssd_anchors(320, 320)
    assert anchors.shape == (3232, 4) and anchors.dtype == np.float32
    np.testing.assert_allclose(anchors, anchors_loop(320, 320), atol=1e-7)
    # The first cell: the 0.1 square, the sqrt(0.1 * 0.2583) square, then ratio 2 and 3 boxes.
    np.testing.assert_allclose(anchors[:2], [[0.025, 0.025, 0.1, 0.1], [0.025, 0.025, 0.16073, 0.16073]], atol=1e-5)
    np.testing.assert_allclose(anchors[2:6, 2:], [[0.14142, 0.07071], [0.07071, 0.14142], [0.17321, 0.05774], [0.05774, 0.17321]], atol=1e-5)
    # The global level: one cell at the center, the widened boxes clipped to the image.
    np.testing.assert_allclose(anchors[-4:], [[0.5, 0.5, 0.89167, 0.89167], [0.5, 0.5, 0.96761, 0.96761],
                                              [0.5, 0.5, 1.0, 0.63051], [0.5, 0.5, 0.63051, 1.0]], atol=1e-5)


def test_other_sizes_follow_the_feature_maps():
    assert A.feature_map_sizes(256, 384) == ((16, 24), (8, 12), (4, 6), (2, 3), (1, 2), (1, 1))
    anchors = A.ssd_anchors(256, 384)
    assert anchors.shape == (6 * (384 + 96 + 24 + 6 + 2) + 4, 4)
    np.testing.assert_allclose(anchors, anchors_loop(256, 384), atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 32"):
        A.ssd_anchors(300, 300)


def test_box_coding_round_trip_and_known_values():
    anchors = jnp.asarray(A.ssd_anchors(320, 320))
    boxes = jax.random.uniform(jax.random.key(0), anchors.shape, minval=0.05, maxval=0.9)
    np.testing.assert_allclose(A.decode(A.encode(boxes, anchors), anchors), boxes, rtol=1e-5, atol=1e-6)
    corner = jnp.asarray([[0.1, 0.2, 0.5, 0.6]])
    np.testing.assert_allclose(A.corner_to_center(corner), [[0.3, 0.4, 0.4, 0.4]], atol=1e-7)
    np.testing.assert_allclose(A.center_to_corner(A.corner_to_center(corner)), corner, atol=1e-7)
    # A box twice an anchor's size, shifted by half its width: (0.5 / 0.1, 0, log 2 / 0.2, log 2 / 0.2).
    loc = A.encode(jnp.asarray([[0.6, 0.5, 0.4, 0.4]]), jnp.asarray([[0.5, 0.5, 0.2, 0.2]]))
    np.testing.assert_allclose(loc, [[5.0, 0.0, math.log(2) / 0.2, math.log(2) / 0.2]], rtol=1e-6)


def test_iou_of_known_boxes():
    a = jnp.asarray([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]])
    b = jnp.asarray([[0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]])
    expected = [[0.0625 / (0.4375 + 1e-5), 0.0, 0.25 / (0.25 + 1e-5)], [0.0225 / (0.2675 + 1e-5), 0.0, 0.04 / (0.25 + 1e-5)]]
    np.testing.assert_allclose(A.box_iou(a, b), expected, rtol=1e-5)


def match_loop(gt_boxes, gt_labels, anchors, threshold):
    """The official assignment with Python loops: best target per anchor, every target forced
    onto its best anchor in order (later ones win), the rest under the threshold background."""
    corner = np.concatenate([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], 1)
    iou = np.asarray(A.box_iou(jnp.asarray(corner), jnp.asarray(gt_boxes)))
    target, best = iou.argmax(1), iou.max(1)
    for t in range(len(gt_boxes)):
        a = iou[:, t].argmax()
        target[a], best[a] = t, 2.0
    labels = np.where(best < threshold, 0, gt_labels[target])
    return target, labels


def test_matching_follows_the_official_assignment():
    anchors = A.ssd_anchors(320, 320)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0.0, 0.7, (5, 2))
    gt = np.concatenate([xy, xy + rng.uniform(0.03, 0.3, (5, 2))], 1).astype(np.float32)
    gt[4] = gt[3] + 0.001  # two near-identical boxes want the same anchor: the later one gets it
    labels = np.asarray([3, 7, 1, 5, 9])
    slots = 8  # three padding slots, with junk that must be ignored
    boxes = np.concatenate([gt, np.tile([[0.4, 0.4, 0.6, 0.6]], (3, 1))]).astype(np.float32)
    padded_labels = np.concatenate([labels, [2, 2, 2]])
    valid = np.arange(slots) < 5
    loc, got = jax.jit(A.match, static_argnames="iou_threshold")(boxes, padded_labels, valid, anchors, iou_threshold=0.5)
    target, expected = match_loop(gt, labels, anchors, 0.5)
    np.testing.assert_array_equal(got, expected)
    iou = np.asarray(A.box_iou(A.center_to_corner(jnp.asarray(anchors)), jnp.asarray(gt)))
    shared = iou[:, 3].argmax()
    assert iou[:, 4].argmax() == shared and got[shared] == 9  # the later ground truth took the anchor
    assert set(np.unique(got)) <= {0, 3, 7, 1, 5, 9} and set(labels) - {5} <= set(np.unique(got))
    assert (got > 0).sum() > 5  # more than the forced anchors pass the threshold
    positive = expected > 0
    matched = np.concatenate([(gt[target, :2] + gt[target, 2:]) / 2, gt[target, 2:] - gt[target, :2]], 1)
    np.testing.assert_allclose(loc[positive], A.encode(jnp.asarray(matched[positive]), jnp.asarray(anchors[positive])), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loc[~positive], 0.0)


def test_a_small_box_is_forced_onto_its_best_anchor_and_no_objects_is_all_background():
    anchors = A.ssd_anchors(320, 320)
    tiny = np.asarray([[0.50, 0.50, 0.52, 0.52]], np.float32)  # IoU with every anchor well under 0.5
    _, labels = A.match(tiny, np.asarray([4]), np.asarray([True]), anchors)
    assert int((np.asarray(labels) == 4).sum()) == 1
    loc, labels = A.match(np.zeros((3, 4), np.float32), np.zeros(3, np.int32), np.zeros(3, bool), anchors)
    assert not np.asarray(labels).any() and np.isfinite(np.asarray(loc)).all()


def multibox_loss_loop(loc_pred, logits, loc_target, labels, ratio):
    """The official loss image by image: positives' smooth L1, cross-entropy over positives and
    the ratio x positives negatives with the highest background loss, over the positive count."""
    reg = cls = 0.0
    num_pos = max(1, int((labels > 0).sum()))
    for b in range(labels.shape[0]):
        log_p = logits[b] - logits[b].max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        pos = labels[b] > 0
        d = np.abs(loc_pred[b][pos] - loc_target[b][pos])
        reg += np.where(d < 1, 0.5 * d**2, d - 0.5).sum()
        negatives = np.flatnonzero(~pos)
        hardest = negatives[np.argsort(log_p[negatives, 0], kind="stable")][: ratio * int(pos.sum())]
        keep = np.concatenate([np.flatnonzero(pos), hardest])
        cls += -log_p[keep, labels[b][keep]].sum()
    return (reg + cls) / num_pos, reg / num_pos, cls / num_pos


def test_multibox_loss_equals_the_official_definition():
    from mvit2_jax.tasks.detection import multibox_loss

    rng = np.random.default_rng(1)
    B, N, C = 3, 50, 5
    loc_pred, loc_target = rng.normal(0, 1.5, (B, N, 4)), rng.normal(0, 1.5, (B, N, 4))
    logits = rng.normal(0, 2, (B, N, C))
    labels = np.where(rng.uniform(size=(B, N)) < 0.1, rng.integers(1, C, (B, N)), 0)
    labels[2] = 0  # an image without objects: no positives, so no negatives either
    assert labels[:2].sum() > 0
    got = jax.jit(multibox_loss)(loc_pred, logits, loc_target, labels)
    np.testing.assert_allclose(got, multibox_loss_loop(loc_pred, logits, loc_target, labels, 3), rtol=1e-5)
    # No positives anywhere: the loss is 0 (divided by 1), not NaN.
    assert float(multibox_loss(loc_pred, logits, loc_target, np.zeros_like(labels))[0]) == 0.0


def test_the_task_loss_reports_its_parts_with_the_configured_negative_ratio():
    """The detection task's loss returns the total and its location and classification parts
    (logged as train metrics, not computed again), both with config.detection.neg_pos_ratio;
    the eval sums use that ratio too."""
    from experiments.detection import quickstart
    from mvit2_jax.tasks.detection import TASK

    rng = np.random.default_rng(2)
    B, N, C = 2, 40, 4
    loc_pred, loc_target = rng.normal(0, 1.5, (B, N, 4)), rng.normal(0, 1.5, (B, N, 4))
    logits = rng.normal(0, 2, (B, N, C))
    labels = np.where(rng.uniform(size=(B, N)) < 0.15, rng.integers(1, C, (B, N)), 0)
    config = quickstart.get_config()
    config.detection.neg_pos_ratio = 1
    total, parts = TASK.loss({"loc": loc_pred, "cls": logits}, (loc_target, labels), config)
    want = multibox_loss_loop(loc_pred, logits, loc_target, labels, 1)
    np.testing.assert_allclose([total, parts["loc_loss"], parts["cls_loss"]], want, rtol=1e-5)
    assert not np.isclose(want[2], multibox_loss_loop(loc_pred, logits, loc_target, labels, 3)[2])
    batch = {"loc": loc_target, "cls": labels, "mask": np.ones(B, np.float32)}
    sums = TASK.eval_sums({"loc": loc_pred, "cls": logits}, batch, config)
    positives = float((labels > 0).sum())
    assert sums["positives"] == positives
    np.testing.assert_allclose([sums["loc_loss"] / positives, sums["cls_loss"] / positives], want[1:], rtol=1e-5)


def postprocess_loop(loc, logits, anchors, threshold, top_k, iou_threshold, max_detections):
    """The official post-processing for one image: per class the scores above the threshold,
    the top_k best, then greedy class-aware NMS in decreasing score over all of them (a kept box
    suppresses a later one of its class with IoU above the threshold), the first max_detections."""
    boxes = np.asarray(A.center_to_corner(A.decode(jnp.asarray(loc), jnp.asarray(anchors))))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    cand = []  # (score, class, box)
    for c in range(1, probs.shape[1]):
        idx = np.flatnonzero(probs[:, c] > threshold)
        idx = idx[np.argsort(-probs[idx, c], kind="stable")][:top_k]
        cand += [(probs[i, c], c, boxes[i]) for i in idx]
    cand.sort(key=lambda t: -t[0])
    kept = []
    for score, c, box in cand:
        if all(k[1] != c or float(A.box_iou(jnp.asarray(box[None]), jnp.asarray(k[2][None]), eps=0.0)[0, 0]) <= iou_threshold for k in kept):
            kept.append((score, c, box))
    return kept[:max_detections]


def test_postprocess_equals_the_official_class_aware_nms_with_static_shapes():
    anchors = A.ssd_anchors(64, 64)  # 4x4, 2x2, 1x1, 1x1, 1x1 and the global cell: 142 anchors
    assert anchors.shape == (142, 4)
    rng = np.random.default_rng(2)
    B, C = 2, 4
    loc = rng.normal(0, 0.5, (B, len(anchors), 4)).astype(np.float32)
    logits = rng.normal(0, 2.0, (B, len(anchors), C)).astype(np.float32)
    logits[1, :, 1:] -= 12.0  # the second image: almost nothing over the threshold
    run = jax.jit(A.postprocess, static_argnames=("score_threshold", "top_k", "iou_threshold", "max_detections"))
    out = run(loc, logits, anchors, score_threshold=0.05, top_k=30, iou_threshold=0.5, max_detections=40)
    assert out["boxes"].shape == (B, 40, 4) and out["classes"].dtype == jnp.int32
    for b in range(B):
        expected = postprocess_loop(loc[b], logits[b], anchors, 0.05, 30, 0.5, 40)
        n = int(out["count"][b])
        assert n == len(expected)
        np.testing.assert_allclose(out["scores"][b, :n], [e[0] for e in expected], rtol=1e-5)
        np.testing.assert_array_equal(out["classes"][b, :n], [e[1] for e in expected])
        np.testing.assert_allclose(out["boxes"][b, :n], np.asarray([e[2] for e in expected]).reshape(-1, 4), atol=1e-5)
        assert not np.asarray(out["scores"][b, n:]).any() and not np.asarray(out["classes"][b, n:]).any()
    assert int(out["count"][0]) == 40 and int(out["count"][1]) < 40  # the cap, and padding
    # NMS removes boxes: with room for every candidate, fewer than the candidates remain.
    e = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
    candidates = sum(min(30, int((p > 0.05).sum())) for p in (e / e.sum(-1, keepdims=True))[:, 1:].T)
    everything = run(loc, logits, anchors, score_threshold=0.05, top_k=30, iou_threshold=0.5, max_detections=200)
    assert 40 < int(everything["count"][0]) < candidates == 90
    assert int(everything["count"][0]) == len(postprocess_loop(loc[0], logits[0], anchors, 0.05, 30, 0.5, 200))
