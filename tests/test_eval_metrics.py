"""Evaluation metrics against independent references (float64 loops, sklearn, hand cases)."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evclip_jax.evaluate.anomaly import anomaly_scores, evaluate_anomaly, roc_auc
from evclip_jax.evaluate.common import batches_from_arrays
from evclip_jax.evaluate.fewshot import (
    evaluate_fewshot,
    fewshot_metrics,
    fewshot_splits,
    ridge_probe_fit,
    ridge_probe_predict,
    sample_support,
)
from evclip_jax.evaluate.knn import knn_translate
from evclip_jax.evaluate.retrieval import (
    cross_modal_retrieval,
    ranked_relevance,
    recall_curve,
    retrieval_metrics,
)
from evclip_jax.evaluate.settings import parse_class_ids
from evclip_jax.evaluate.zeroshot import (
    evaluate_zeroshot,
    top_k_accuracy,
    zeroshot_metrics,
)

# ----------------------------------------------------------------------------- references


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / math.sqrt(float(np.dot(v, v)))


def ref_ranking(query, keys):
    """Key indices by descending cosine similarity, ties by ascending key index."""
    q = _unit(query)
    sims = [float(np.dot(q, _unit(k))) for k in keys]
    return sorted(range(len(keys)), key=lambda j: (-sims[j], j)), sims


def ref_retrieval(q_emb, q_lab, k_emb, k_lab, ks=(1, 5, 10)):
    """Brute-force float64 R@K, mAP@1/5, MRR with explicit loops over queries."""
    totals = {f"R@{k}": 0.0 for k in ks}
    totals.update({"mAP@1": 0.0, "mAP@5": 0.0, "MRR": 0.0})
    for i in range(len(q_emb)):
        order, _ = ref_ranking(q_emb[i], k_emb)
        rel = [1 if k_lab[j] == q_lab[i] else 0 for j in order]
        for k in ks:
            totals[f"R@{k}"] += 1.0 if any(rel[:k]) else 0.0
        for k in (1, 5):
            hits, acc = 0, 0.0
            for rank, r in enumerate(rel[:k], start=1):
                if r:
                    hits += 1
                    acc += hits / rank
            totals[f"mAP@{k}"] += acc / hits if hits else 0.0
        for rank, r in enumerate(rel, start=1):
            if r:
                totals["MRR"] += 1.0 / rank
                break
    return {name: value / len(q_emb) for name, value in totals.items()}


def ref_topk(scores, labels, k, candidates):
    correct = 0
    for i in range(len(scores)):
        order = sorted(range(len(candidates)), key=lambda j: (-scores[i][j], candidates[j]))
        correct += labels[i] in [candidates[j] for j in order[:k]]
    return correct / len(scores)


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_hand_computed():
    # keys: k0=(1,0) A, k1=(0,1) B, k2=(1,1) A, k3=(-1,0) C   (A=0, B=1, C=2)
    keys = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
    key_labels = np.array([0, 1, 0, 2])
    # q0=(1,.1) B: sims .995, .0995, .774, -.995 -> order k0 k2 k1 k3, rel 0 0 1 0
    #   R@1 0, R@5 1, AP@1 0, AP@5 (1/3)/1 = 1/3, RR 1/3
    # q1=(0,1) A: sims 0, 1, .707, 0 -> tie k0/k3 at 0: k0 first (lower index)
    #   order k1 k2 k0 k3, rel 0 1 1 0: R@1 0, AP@1 0, AP@5 (1/2 + 2/3)/2 = 7/12, RR 1/2
    #   (the other tie order would give AP@5 (1/2 + 2/4)/2 = 1/2)
    # q2=(-1,-1) C: sims -.707, -.707, -1, .707 -> order k3 k0 k1 k2, rel 1 0 0 0
    #   R@1 1, AP@1 1, AP@5 1, RR 1
    queries = np.array([[1, 0.1], [0, 1], [-1, -1]], np.float32)
    query_labels = np.array([1, 0, 2])
    got = retrieval_metrics(queries, query_labels, keys, key_labels)
    want = {"R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0, "mAP@1": 1 / 3,
            "mAP@5": (1 / 3 + 7 / 12 + 1) / 3, "MRR": (1 / 3 + 1 / 2 + 1) / 3}
    assert list(got) == ["R@1", "R@5", "R@10", "mAP@1", "mAP@5", "MRR"]
    assert all(isinstance(v, float) for v in got.values())
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got == pytest.approx(ref_retrieval(queries, query_labels, keys, key_labels))


def test_retrieval_ties_lower_key_index_first():
    # Two identical keys: the one with the lower index ranks first.
    keys = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = np.array([[1.0, 0.0]])
    rel_second = retrieval_metrics(query, [0], keys, [1, 0, 2])  # relevant key is index 1
    assert rel_second["R@1"] == 0.0 and rel_second["MRR"] == 0.5
    assert rel_second["mAP@5"] == 0.5
    rel_first = retrieval_metrics(query, [0], keys, [0, 1, 2])  # relevant key is index 0
    assert rel_first["R@1"] == 1.0 and rel_first["MRR"] == 1.0


def test_retrieval_query_without_relevant_key_counts_zero():
    keys = np.eye(3)
    queries = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    got = retrieval_metrics(queries, [0, 7], keys, [0, 1, 2], ks=(1,))
    assert got == {"R@1": 0.5, "mAP@1": 0.5, "mAP@5": 0.5, "MRR": 0.5}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_random_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(23, 8)).astype(np.float32)
    k = rng.normal(size=(31, 8)).astype(np.float32) * rng.uniform(0.5, 3, size=(31, 1))
    ql, kl = rng.integers(0, 6, 23), rng.integers(0, 6, 31)
    ks = (1, 3, 5, 10, 40)
    got = retrieval_metrics(q, ql, k, kl, ks=ks)
    want = ref_retrieval(q, ql, k, kl, ks=ks)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_retrieval_mean_ap_equals_sklearn_when_all_relevant_in_top_k():
    # 5 keys, K=5: every relevant key is in the top K, so AP@5 is the full-ranking AP.
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(40, 4)), rng.normal(size=(5, 4))
    ql, kl = rng.integers(0, 3, 40), rng.integers(0, 3, 5)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        k / np.linalg.norm(k, axis=1, keepdims=True)).T
    per_query = [average_precision_score(kl == ql[i], sims[i]) if np.any(kl == ql[i]) else 0.0
                 for i in range(40)]
    assert retrieval_metrics(q, ql, k, kl)["mAP@5"] == pytest.approx(np.mean(per_query))


def test_ranked_relevance_chunking_and_recall_curve():
    rng = np.random.default_rng(4)
    q, k = rng.normal(size=(17, 5)), rng.normal(size=(12, 5))
    ql, kl = rng.integers(0, 4, 17), rng.integers(0, 4, 12)
    whole = np.concatenate(list(ranked_relevance(q, ql, k, kl, chunk_size=100)))
    chunked = np.concatenate(list(ranked_relevance(q, ql, k, kl, chunk_size=3)))
    np.testing.assert_array_equal(whole, chunked)
    ks, recall = recall_curve(q, ql, k, kl, max_k=50)
    np.testing.assert_array_equal(ks, np.arange(1, 13))
    want = ref_retrieval(q, ql, k, kl, ks=tuple(range(1, 13)))
    np.testing.assert_allclose(recall, [want[f"R@{i}"] for i in range(1, 13)], atol=1e-12)


def test_cross_modal_directions():
    rng = np.random.default_rng(5)
    ev, im, tx = rng.normal(size=(9, 4)), rng.normal(size=(9, 4)), rng.normal(size=(3, 4))
    labels = rng.integers(0, 3, 9)
    got = cross_modal_retrieval(ev, labels, im, None, tx)
    assert set(got) == {"event_to_image", "image_to_event", "event_to_text", "text_to_event"}
    assert got["event_to_image"] == pytest.approx(ref_retrieval(ev, labels, im, labels))
    assert got["image_to_event"] == pytest.approx(ref_retrieval(im, labels, ev, labels))
    assert got["event_to_text"] == pytest.approx(ref_retrieval(ev, labels, tx, np.arange(3)))
    assert got["text_to_event"] == pytest.approx(ref_retrieval(tx, np.arange(3), ev, labels))


def test_retrieval_rejects_bad_shapes():
    with pytest.raises(ValueError, match="key_emb"):
        retrieval_metrics(np.ones((2, 3)), [0, 1], np.ones((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(np.ones((2, 3)), [0], np.ones((2, 3)), [0, 1])


# ----------------------------------------------------------------------------- anomaly


def test_roc_auc_hand_and_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's doc example
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts one half
    # pos scores {2, 1}, neg {1, 0}: pairs (2>1),(2>0),(1=1 -> 1/2),(1>0) -> 3.5/4
    assert roc_auc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("levels", [None, 4, 2])
def test_roc_auc_matches_sklearn(levels):
    rng = np.random.default_rng(levels or 0)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels
    if levels:  # many ties
        scores = np.floor(scores * levels / 2)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_single_class_raises():
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2], [0, 2])


def test_anomaly_scores_bruteforce():
    rng = np.random.default_rng(6)
    ev, normal, abnormal = rng.normal(size=(7, 5)), rng.normal(size=(2, 5)), rng.normal(
        size=(3, 5))
    log_s = math.log(100.0)
    got = anomaly_scores(ev, normal, abnormal, log_s)
    for i in range(7):
        logits = [100.0 * float(np.dot(_unit(ev[i]), _unit(t)))
                  for t in list(normal) + list(abnormal)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        assert got[i] == pytest.approx(sum(exps[2:]) / sum(exps), abs=1e-12)
    with pytest.raises(ValueError, match="logit_scale"):
        anomaly_scores(ev, normal, abnormal, 100.0)


def test_evaluate_anomaly_end_to_end():
    rng = np.random.default_rng(7)
    labels = np.array([0, 1] * 10 + [1])
    ev = rng.normal(size=(21, 4)).astype(np.float32)
    normal, abnormal = rng.normal(size=(1, 4)), rng.normal(size=(2, 4))
    batches = batches_from_arrays({"events": ev, "labels": labels}, batch_size=8)
    metrics, details = evaluate_anomaly(lambda x: x, batches, normal, abnormal, 4.0,
                                        return_details=True)
    scores = anomaly_scores(ev, normal, abnormal, 4.0)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["num_instances"] == 21 and metrics["num_anomalous"] == 11
    np.testing.assert_array_equal(details["labels"], labels)


# ----------------------------------------------------------------------------- zero-shot


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_accuracy_bruteforce_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(60, 9)).astype(np.float64)  # many ties
    candidates = np.sort(rng.choice(50, 9, replace=False))
    labels = candidates[rng.integers(0, 9, 60)]
    got = top_k_accuracy(scores, labels, ks=(1, 2, 5, 20), candidate_classes=candidates)
    for k in (1, 2, 5, 20):
        assert got[f"top{k}"] == pytest.approx(ref_topk(scores, labels, k, list(candidates)))


def test_top_k_tie_rule_lower_class_first():
    scores = np.array([[1.0, 1.0, 0.0]])
    assert top_k_accuracy(scores, [0], ks=(1,))["top1"] == 1.0
    assert top_k_accuracy(scores, [1], ks=(1, 2)) == {"top1": 0.0, "top2": 1.0}


def test_zeroshot_metrics_rank_against_all_and_heldout():
    rng = np.random.default_rng(8)
    text = rng.normal(size=(10, 6))
    labels = rng.integers(0, 10, 80)
    ev = text[labels] + 1.5 * rng.normal(size=(80, 6))
    heldout = [6, 7, 8, 9]
    keep = np.isin(labels, heldout)
    sims = np.array([[np.dot(_unit(e), _unit(t)) for t in text] for e in ev[keep]])
    all_ = zeroshot_metrics(ev, labels, text, heldout, "all")
    assert all_["num_samples"] == keep.sum()
    assert all_["top1"] == pytest.approx(ref_topk(sims, labels[keep], 1, list(range(10))))
    assert all_["top5"] == pytest.approx(ref_topk(sims, labels[keep], 5, list(range(10))))
    held, details = zeroshot_metrics(ev, labels, text, heldout, "heldout", return_details=True)
    assert held["top1"] == pytest.approx(ref_topk(sims[:, heldout], labels[keep], 1, heldout))
    assert held["top5"] == 1.0  # only 4 candidates
    assert details["confusion"].shape == (4, 4)
    assert details["confusion"].sum() == keep.sum()
    for row, c in enumerate(heldout):
        in_class = labels[keep] == c
        pred = np.array(heldout)[np.argmax(sims[:, heldout], axis=1)]
        assert details["per_class_accuracy"][row] == pytest.approx(
            np.mean(pred[in_class] == c))
    with pytest.raises(ValueError, match="heldout"):
        zeroshot_metrics(ev, labels, text, None, "heldout")


def test_heldout_classes_nimagenet_mini():
    """config.eval.heldout_classes "80-99" of N-ImageNet mini's 100 classes."""
    np.testing.assert_array_equal(parse_class_ids("80-99", 100), np.arange(80, 100))
    np.testing.assert_array_equal(parse_class_ids("0-2,7", 100), [0, 1, 2, 7])
    assert parse_class_ids("", 100) is None
    with pytest.raises(ValueError, match="heldout_classes.*\\[0, 100\\)"):
        parse_class_ids("90-100", 100)


def test_evaluate_zeroshot_with_knn_translation():
    rng = np.random.default_rng(9)
    text = rng.normal(size=(5, 6))
    labels = rng.integers(0, 5, 30)
    ev = (text[labels] + rng.normal(size=(30, 6))).astype(np.float32)
    pool = rng.normal(size=(40, 6))
    batches = batches_from_arrays({"events": ev, "labels": labels}, 16)
    got = evaluate_zeroshot(lambda x: x, batches, text, knn_pool=pool, knn_k=4,
                            knn_temperature=0.1)
    translated = knn_translate(ev, pool, 4, "softmax", 0.1)
    assert got == zeroshot_metrics(translated, labels, text)


# ----------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("weighting", ["softmax", "cosine"])
def test_knn_translate_bruteforce(weighting):
    rng = np.random.default_rng(10)
    ev, pool = rng.normal(size=(6, 5)), rng.normal(size=(15, 5)) * 2
    pool[3] = pool[7]  # an exact tie: index 3 wins
    got = knn_translate(ev, pool, k=4, weighting=weighting, temperature=0.05)
    for i in range(6):
        order, sims = ref_ranking(ev[i], pool)
        top = order[:4]
        if weighting == "softmax":
            m = max(sims[j] for j in top)
            w = [math.exp((sims[j] - m) / 0.05) for j in top]
        else:
            w = [max(sims[j], 0.0) for j in top]
            w = w if sum(w) > 0 else [1.0] * 4
        want = sum(wj * _unit(pool[j]) for wj, j in zip(w, top, strict=True)) / sum(w)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        knn_translate(ev, pool, k=16)


# ----------------------------------------------------------------------------- few-shot


def test_sample_support_properties():
    rng = np.random.default_rng(11)
    labels = rng.permutation(np.repeat(np.arange(6), 12))
    for shots in (1, 2, 5, 7):
        a = sample_support(labels, shots, seed=0)
        np.testing.assert_array_equal(a, sample_support(labels, shots, seed=0))
        assert not np.array_equal(a, sample_support(labels, shots, seed=1))
        np.testing.assert_array_equal(np.bincount(labels[a], minlength=6), [shots] * 6)
        assert len(set(a.tolist())) == a.size
    sub = sample_support(labels, 2, seed=3, classes=[4, 5])
    np.testing.assert_array_equal(np.bincount(labels[sub], minlength=6), [0, 0, 0, 0, 2, 2])
    with pytest.raises(ValueError, match="fewer than 13"):
        sample_support(labels, 13, seed=0)


def test_fewshot_splits_disjoint_and_separate():
    labels = np.repeat(np.arange(4), 10)
    splits = fewshot_splits(labels, shots=(1, 2, 5), seeds=(0, 1, 2), classes=[1, 2, 3])
    assert [(s.shots, s.seed) for s in splits] == [(n, s) for n in (1, 2, 5) for s in (0, 1, 2)]
    for split in splits:
        assert np.intersect1d(split.support, split.query).size == 0
        np.testing.assert_array_equal(
            np.sort(np.concatenate([split.support, split.query])), np.arange(10, 40))
        assert split.support.size == 3 * split.shots
    eval_labels = np.array([0, 1, 2, 3, 3, 1])
    separate = fewshot_splits(labels, (2,), (0,), eval_labels, classes=[1, 3])
    np.testing.assert_array_equal(separate[0].query, [1, 3, 4, 5])


def ref_ridge(x, labels, classes, lam):
    """Ridge with an unpenalised intercept via the augmented normal equations [X 1]."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (labels[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
    a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    penalty = lam * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    sol = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    return sol[:-1], sol[-1]


@pytest.mark.parametrize("n,d", [(12, 30), (60, 7)])  # dual and primal paths
def test_ridge_probe_matches_closed_form(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, 3, n) + 10
    classes = np.array([10, 11, 12])
    w, b = ridge_probe_fit(x.astype(np.float32), labels, classes, l2_reg=0.3)
    w_ref, b_ref = ref_ridge(x.astype(np.float32).astype(np.float64), labels, classes, 0.3)
    np.testing.assert_allclose(w, w_ref, atol=1e-9)
    np.testing.assert_allclose(b, b_ref, atol=1e-9)
    xt = rng.normal(size=(20, d))
    xt_unit = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    np.testing.assert_array_equal(ridge_probe_predict(xt, w, b, classes),
                                  classes[np.argmax(xt_unit @ w_ref + b_ref, axis=1)])


def test_fewshot_metrics_mean_std():
    rng = np.random.default_rng(12)
    centres = rng.normal(size=(4, 6))
    labels = np.repeat(np.arange(4), 8)
    feats = centres[labels] + 0.8 * rng.normal(size=(32, 6))
    splits = fewshot_splits(labels, (1, 2), (0, 1, 2))
    got, details = fewshot_metrics(feats, labels, splits, l2_reg=0.1, return_details=True)
    for n in (1, 2):
        accs = []
        for s in [s for s in splits if s.shots == n]:
            w, b = ref_ridge(feats[s.support], labels[s.support], np.arange(4), 0.1)
            xq = feats[s.query] / np.linalg.norm(feats[s.query], axis=1, keepdims=True)
            accs.append(np.mean(np.argmax(xq @ w + b, axis=1) == labels[s.query]))
        assert got[f"{n}shot/top1"] == pytest.approx(np.mean(accs))
        assert got[f"{n}shot/top1_std"] == pytest.approx(np.std(accs))
    np.testing.assert_array_equal(details["shots"], [1, 2])


def test_evaluate_fewshot_probe_and_finetune_hook():
    rng = np.random.default_rng(13)
    centres = rng.normal(size=(3, 5))
    train_labels, eval_labels = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 4)
    train = (centres[train_labels] + 0.5 * rng.normal(size=(18, 5))).astype(np.float32)
    ev = (centres[eval_labels] + 0.5 * rng.normal(size=(12, 5))).astype(np.float32)
    eval_batches = list(batches_from_arrays({"events": ev, "labels": eval_labels}, 8))
    train_batches = list(batches_from_arrays({"events": train, "labels": train_labels}, 8))

    got = evaluate_fewshot(lambda x: x, eval_batches, (1, 2), (0, 1),
                           support_batches=train_batches)
    splits = fewshot_splits(train_labels, (1, 2), (0, 1), eval_labels)
    assert got == fewshot_metrics(ev, eval_labels, splits, train, train_labels)

    calls, pool_arrays = [], [(train, train_labels)]

    def finetune_fn(support_indices, *, shots, seed):
        calls.append((shots, seed, support_indices.copy()))
        pool, pool_labels = pool_arrays[-1]
        means = np.stack([pool[support_indices][pool_labels[support_indices] == c].mean(0)
                          for c in range(3)])
        return lambda x: -((x[:, None, :] - means[None]) ** 2).sum(-1)  # nearest class mean

    tuned = evaluate_fewshot(None, eval_batches, (1, 2), (0, 1), support_batches=train_batches,
                             finetune_fn=finetune_fn)
    assert [(c[0], c[1]) for c in calls] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for (_, _, idx), split in zip(calls, splits, strict=True):
        np.testing.assert_array_equal(idx, split.support)
    accs = {1: [], 2: []}
    for shots, _, idx in calls:
        means = np.stack([train[idx][train_labels[idx] == c].mean(0) for c in range(3)])
        pred = np.argmin(((ev[:, None] - means[None]) ** 2).sum(-1), axis=1)
        accs[shots].append(np.mean(pred == eval_labels))
    for n in (1, 2):
        assert tuned[f"{n}shot/top1"] == pytest.approx(np.mean(accs[n]), abs=1e-6)
    # Single split: support drawn from the eval batches themselves, scored on the rest.
    calls.clear()
    pool_arrays.append((ev, eval_labels))
    single = evaluate_fewshot(None, eval_batches, (2,), (5,), finetune_fn=finetune_fn)
    (split,) = fewshot_splits(eval_labels, (2,), (5,))
    np.testing.assert_array_equal(calls[0][2], split.support)
    assert split.query.size == 12 - 6
    means = np.stack([ev[split.support][eval_labels[split.support] == c].mean(0)
                      for c in range(3)])
    pred = np.argmin(((ev[split.query][:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert single["2shot/top1"] == pytest.approx(np.mean(pred == eval_labels[split.query]))
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluate_fewshot(None, iter(eval_batches), (1,), (0,), finetune_fn=finetune_fn)
