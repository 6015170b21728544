"""Five-modality retrieval (paper Sec. 4.4, Fig. 3, Table 4): event queries, keys per modality.

Key sets: ``image`` (the eval split's paired images through the image tower, when it has
them), ``text`` (the class prompts through the text tower) and one per entry
``name=path`` of ``config.eval.modalities``: embeddings the user computed elsewhere (the
paper's sound and depth, through ImageBind):

* ``.npz`` with ``embeddings`` [n, D], ``labels`` [n] and optionally ``class_names`` [C] (a
  str array the labels index). With class names, keys are matched to queries by name, so a
  sound set with its own class list can be scored against an event set; a name the event set
  does not have is relevant to no query. Without, labels are the event set's class ids.
* ``.npy`` embeddings [n, D] with ``<stem>_labels.npy`` [n] beside it (event-set class ids).

All similarities are taken in one space, so that the cross-modality query compares like with
like: with an adapter (adapter.py) the event queries and our towers' keys are mapped into the
space of the user's files; without one those files must hold CLIP-space embeddings.

Per pair event->modality: ``retrieval.retrieval_metrics`` (R@1/5/10, mAP@1/5, MRR). Fig. 3's
cross-modality query: each query's best key over all modalities (the highest cosine; ties go
to the earlier modality, then the lower key index, as retrieval's tie rule); reported as the
share of queries that picked each modality and ``cross/top1``, the share whose pick is
relevant to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from evclip_jax.adapter import Adapter
from evclip_jax.embed import l2_normalize_f64
from evclip_jax.evaluate.common import check_embeddings, check_labels
from evclip_jax.evaluate.retrieval import recall_curve, retrieval_metrics

FIELD = "config.eval.modalities"
TOWER_MODALITIES = ("image", "text")  # keys from our own towers

# Queries per similarity block, so one float64 block stays around 128 MiB.
_CHUNK_ELEMENTS = 1 << 24

Keys = Mapping[str, tuple[np.ndarray, np.ndarray]]  # modality -> (embeddings, labels)


def labels_path(npy_path: str) -> str:
    """``<stem>_labels.npy``: where the labels of a ``.npy`` embedding file live."""
    return os.path.splitext(npy_path)[0] + "_labels.npy"


def parse_modalities(entries: Sequence[str]) -> dict[str, str]:
    """{name: path} of ``config.eval.modalities`` entries "name=path", each file checked to
    exist (an ``.npy`` with its labels file) before any compute."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = str(entry).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"{FIELD}: {entry!r}: expected 'name=path', e.g. "
                             "'sound=/data/esc50_imagebind.npz'")
        if name in TOWER_MODALITIES:
            raise ValueError(f"{FIELD}: {entry!r}: {name!r} is a key set of our own towers "
                             f"({', '.join(TOWER_MODALITIES)}); give the file another name")
        if name in out:
            raise ValueError(f"{FIELD}: modality {name!r} is given twice")
        if not path.endswith((".npz", ".npy")):
            raise ValueError(f"{FIELD}: {path}: expected an .npz (embeddings, labels) or an "
                             ".npy (with <stem>_labels.npy beside it)")
        if not os.path.isfile(path):
            raise ValueError(f"{FIELD}: {path}: file not found")
        if path.endswith(".npy") and not os.path.isfile(labels_path(path)):
            raise ValueError(f"{FIELD}: {path}: its labels file {labels_path(path)} not found "
                             "(one label per row of the embeddings)")
        out[name] = path
    return out


def _load_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(embeddings, labels, class names or None) as stored in one modality file."""
    try:
        if path.endswith(".npy"):
            return (np.load(path, allow_pickle=False),
                    np.load(labels_path(path), allow_pickle=False), None)
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("embeddings", "labels") if k not in data]
            if missing:
                raise ValueError(f"{FIELD}: {path}: lacks {missing}; expected keys embeddings "
                                 f"[n, D], labels [n] and optional class_names, got "
                                 f"{sorted(data)}")
            names = data["class_names"] if "class_names" in data else None
            return np.asarray(data["embeddings"]), np.asarray(data["labels"]), names
    except (OSError, EOFError) as e:
        raise ValueError(f"{FIELD}: {path}: cannot read ({e})") from e
    except ValueError as e:
        if str(e).startswith(FIELD):
            raise
        # e.g. an object array, which would need pickle: class names must be a str array.
        raise ValueError(f"{FIELD}: {path}: cannot read without pickle ({e}); store "
                         "class_names as a str array") from e


def load_modality(path: str, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [n, D], labels int64 [n] as event-set class ids, -1 for a class the
    event set does not have) of one modality file; ``class_names``: the event set's."""
    emb, labels, names = _load_arrays(path)
    emb = check_embeddings(f"{FIELD}: {path}: embeddings", emb).astype(np.float32)
    labels = check_labels(f"{FIELD}: {path}: labels", labels, emb.shape[0])
    num = len(class_names) if names is None else len(names)
    if labels.size and (labels.min() < 0 or labels.max() >= num):
        what = (f"its {num} class_names" if names is not None
                else f"the {num} classes of the event set (add class_names to match by name)")
        raise ValueError(f"{FIELD}: {path}: labels must index {what}; got values in "
                         f"[{labels.min()}, {labels.max()}]")
    if names is None:
        return emb, labels
    ids = {str(name): i for i, name in enumerate(class_names)}
    mapping = np.array([ids.get(str(name), -1) for name in np.asarray(names).reshape(-1)],
                       np.int64)
    return emb, mapping[labels]


def cross_modality_query(query_emb: np.ndarray, key_embs: Mapping[str, np.ndarray]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fig. 3: each query's best key over all modalities, by cosine similarity in float64.

    Returns (modality index [n] into ``key_embs``' order, key index [n] within that
    modality, best similarity per modality [n, M]). Ties: the earlier modality, then the
    lower key index.
    """
    if not key_embs:
        raise ValueError("cross_modality_query: expected at least one key set")
    q = l2_normalize_f64(check_embeddings("query_emb", query_emb))
    keys = [l2_normalize_f64(check_embeddings(f"keys {name}", emb, dim=q.shape[1]))
            for name, emb in key_embs.items()]
    rows = np.arange(q.shape[0])
    best = np.empty((q.shape[0], len(keys)))
    index = np.empty((q.shape[0], len(keys)), np.int64)
    for m, k in enumerate(keys):
        if k.shape[0] == 0:
            raise ValueError(f"cross_modality_query: key set {list(key_embs)[m]!r} is empty")
        chunk = max(1, _CHUNK_ELEMENTS // k.shape[0])
        for start in range(0, q.shape[0], chunk):
            sims = q[start:start + chunk] @ k.T
            top = np.argmax(sims, axis=1)  # the first maximum: the lower key index
            index[start:start + chunk, m] = top
            best[start:start + chunk, m] = sims[np.arange(sims.shape[0]), top]
    modality = np.argmax(best, axis=1)  # the first maximum: the earlier modality
    return modality, index[rows, modality], best


def modality_retrieval(query_emb: np.ndarray, query_labels: np.ndarray, keys: Keys,
                       ks: Sequence[int] = (1, 5, 10), curve_max_k: int = 0
                       ) -> tuple[dict[str, float], dict]:
    """Metrics of event queries against several key sets that share one space.

    Keys "event_to_<modality>/R@K|mAP@1|mAP@5|MRR", "cross/share/<modality>" and
    "cross/top1". Details: {"modality": picked modality name per query, "index": picked key
    index per query, "recall_at_k": {"event to <modality>": {"ks", "recall"}} when
    ``curve_max_k`` > 0}.
    """
    metrics: dict[str, float] = {}
    for name, (emb, labels) in keys.items():
        for k, v in retrieval_metrics(query_emb, query_labels, emb, labels, ks).items():
            metrics[f"event_to_{name}/{k}"] = float(v)
    names = list(keys)
    modality, index, _ = cross_modality_query(query_emb, {n: e for n, (e, _) in keys.items()})
    for m, name in enumerate(names):
        metrics[f"cross/share/{name}"] = float(np.mean(modality == m))
    picked = np.array([keys[names[m]][1][i] for m, i in zip(modality, index, strict=True)])
    metrics["cross/top1"] = float(np.mean(picked == np.asarray(query_labels)))
    details: dict = {"modality": [names[m] for m in modality], "index": index}
    if curve_max_k > 0:
        details["recall_at_k"] = {}
        for name, (emb, labels) in keys.items():
            ks_curve, recall = recall_curve(query_emb, query_labels, emb, labels, curve_max_k)
            details["recall_at_k"][f"event to {name}"] = {"ks": ks_curve, "recall": recall}
    return metrics, details


def evaluate_modalities(
    event_emb: np.ndarray,
    event_labels: np.ndarray,
    image_emb: np.ndarray | None,
    text_emb: np.ndarray,
    text_labels: np.ndarray,
    class_names: Sequence[str],
    modality_files: Mapping[str, str],
    adapter: Adapter | None = None,
    ks: Sequence[int] = (1, 5, 10),
    curve_max_k: int = 0,
) -> tuple[dict[str, float], dict]:
    """The runner's entry: our towers' keys (paired images, class prompts with their class ids
    ``text_labels``) and the user's ``modality_files`` ({name: path}, ``parse_modalities``)
    scored against the event queries, through ``adapter`` when given (module docstring).
    Returns ``modality_retrieval``'s metrics and details."""
    def to_space(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) if adapter is None else adapter(x)

    keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if image_emb is not None:
        keys["image"] = (to_space(image_emb), np.asarray(event_labels))
    keys["text"] = (to_space(text_emb), np.asarray(text_labels))
    dim = np.shape(event_emb)[1] if adapter is None else adapter.out_dim
    for name, path in modality_files.items():
        emb, labels = load_modality(path, class_names)
        if emb.shape[1] != dim:
            space = ("the adapter's target dim" if adapter is not None else "the CLIP "
                     "projection dim; set config.adapter.pairs to map events into the space of "
                     "this file")
            raise ValueError(f"{FIELD}: {path}: embeddings have dim {emb.shape[1]}; expected "
                             f"{dim} ({space})")
        keys[name] = (emb, labels)
    return modality_retrieval(to_space(event_emb), event_labels, keys, ks, curve_max_k)
