"""The teacher's top-k next-token distribution at every learned position of a dataset, on disk (issue 48): the
teacher runs once over the data instead of once per epoch.

For each learned position, the k likeliest ids under softmax(teacher logits / T) and their log-probabilities; the
rest of the mass (1 - their sum) is spread evenly over the other V - k ids, so that every divergence (forward KL,
reverse KL and the JSD between) stays finite. With k = V the distribution is the teacher's own. An example is
found by its content (its ids and mask up to its last learned position: the teacher's outputs there depend on
nothing else), so the loop's shuffling, padding and sharding need not tell the objective which example a row is.

Files, in the cache folder: NAME.bin (k int32 ids for every cached position, then k float32 log-probs for every
one) and NAME.json (what the cache was built from, the .bin's sha256, and each example's first position and
count). NAME holds a digest of the teacher's weights, the data's rows, k, T and V, so a cache of another teacher
or other data is never opened; one whose bytes do not match its sha256 is rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillm.files import atomic_path, read_json, sha256_file, write_json
from minillm.train.reference import Reference


def row_key(x_T: torch.Tensor, m_T: torch.Tensor) -> str:
    """A row's identity for the cache: its input ids and mask up to its last learned position."""
    learned = (m_T > 0).nonzero()
    n = int(learned[-1]) + 1 if len(learned) else 0
    h = hashlib.blake2b(digest_size=16)
    h.update(x_T[:n].cpu().numpy().astype(np.int64).tobytes())
    h.update((m_T[:n] > 0).cpu().numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers, by name (which teacher a cache was built from)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """A built cache, memory-mapped: the teacher's log-probabilities at the learned positions of any batch of the
    dataset it was built from."""

    def __init__(self, bin_path: Path, meta: dict) -> None:
        self.k, self.vocab, self.temperature = meta["k"], meta["vocab"], meta["temperature"]
        self.examples: dict[str, list[int]] = meta["examples"]  # row key -> [first position, learned positions]
        n = meta["positions"]
        self.ids = np.memmap(bin_path, dtype=np.int32, mode="r", shape=(n, self.k))
        self.logps = np.memmap(bin_path, dtype=np.float32, mode="r", shape=(n, self.k), offset=n * self.k * 4)

    def log_probs(self, x_BT: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
        """[N, V] teacher log-probabilities at the learned positions (m_BT > 0), in row-major order."""
        parts = []
        for x_T, m_T in zip(x_BT, m_BT):
            first, count = self.examples.get(row_key(x_T, m_T), (None, 0))
            learned = int((m_T > 0).sum())
            if first is None or count != learned:
                raise KeyError("a batch row is not in the teacher cache (the data changed since it was built)")
            parts.append((first, count))
        ids = np.concatenate([self.ids[a:a + n] for a, n in parts]) if parts else np.zeros((0, self.k), np.int32)
        logps = np.concatenate([self.logps[a:a + n] for a, n in parts]) if parts else np.zeros((0, self.k), np.float32)
        # Only the k columns travel to the device; the [N, V] rows are made there.
        return dense(torch.from_numpy(ids).to(x_BT.device).long(), torch.from_numpy(logps).to(x_BT.device), self.vocab)


def dense(ids_NK: torch.Tensor, logps_NK: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] log-probabilities: the k cached ones, the rest of the mass spread evenly over the other ids."""
    k = ids_NK.shape[-1]
    if k >= vocab:
        tail_N1 = torch.full((len(ids_NK), 1), -math.inf, device=ids_NK.device)
    else:  # log((1 - sum of the top k) / (V - k)), the remainder held above 0 against rounding
        rest_N1 = (1 - logps_NK.double().exp().sum(-1, keepdim=True)).clamp_min(1e-30)
        tail_N1 = (rest_N1 / (vocab - k)).log().float()
    return tail_N1.expand(len(ids_NK), vocab).clone().scatter_(1, ids_NK, logps_NK)


def top_k(teacher_logits_NV: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k likeliest ids of each row under softmax(logits / T), and their log-probabilities."""
    logps = torch.log_softmax(teacher_logits_NV.float() / temperature, dim=-1)
    values, ids = logps.topk(min(k, logps.shape[-1]), dim=-1)
    return ids.int(), values


@torch.no_grad()
def build_or_load(teacher: Reference, dataset: torch.utils.data.Dataset, folder: Path, k: int, temperature: float,
                  vocab: int, device: torch.device, batch_size: int = 16, verbose: bool = True) -> TeacherCache:
    """The dataset's teacher cache in `folder`: opened when it is there and whole, else built (the teacher over
    every example once, in order) and written atomically."""
    data = hashlib.sha256()
    for i in range(len(dataset)):
        x_T, _, m_T = dataset[i]
        data.update(row_key(x_T, m_T).encode())
    key = {"teacher_weights": weights_digest(teacher.model), "data": data.hexdigest(), "k": min(k, vocab),
           "temperature": temperature, "vocab": vocab}
    name = "teacher-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    bin_path, meta_path = folder / f"{name}.bin", folder / f"{name}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = read_json(meta_path)
        if meta.get("key") == key and meta.get("sha256") == sha256_file(bin_path):
            return TeacherCache(bin_path, {**meta, **key})
        print(f"note: the teacher cache {bin_path} does not match the checksum written when it was built; "
              "rebuilding it", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    examples: dict[str, list[int]] = {}
    ids_parts, logp_parts, position = [], [], 0
    for a in tqdm(range(0, len(dataset), batch_size), desc="teacher cache", unit="batch", disable=not verbose):
        batch = [dataset[i] for i in range(a, min(a + batch_size, len(dataset)))]
        logits_BTV = teacher.logits(torch.stack([x for x, _, _ in batch]).to(device))[..., :vocab].cpu()
        for (x_T, _, m_T), logits_TV in zip(batch, logits_BTV):
            row = row_key(x_T, m_T)
            learned = m_T > 0
            if row in examples:  # the same content: the same teacher outputs
                continue
            ids, logps = top_k(logits_TV[learned], k, temperature)
            examples[row] = [position, int(learned.sum())]
            ids_parts.append(ids.numpy())
            logp_parts.append(logps.numpy())
            position += len(ids)
    with atomic_path(bin_path) as tmp:
        with open(tmp, "wb") as f:
            for part in ids_parts:
                f.write(np.ascontiguousarray(part, dtype=np.int32).tobytes())
            for part in logp_parts:
                f.write(np.ascontiguousarray(part, dtype=np.float32).tobytes())
    meta = {"key": key, "sha256": sha256_file(bin_path), "positions": position, "examples": examples}
    write_json(meta_path, meta)
    return TeacherCache(bin_path, {**meta, **key})
