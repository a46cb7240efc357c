"""Encode a dataset once into an on-disk latent cache, and read it back memory-mapped.

Layout of a cache folder::

    spec.json                     what is being built (written first, by every rank)
    shard_00000.safetensors       tensors ``latents`` [n, C, H, W], ``labels`` [n] (long)
    shard_00001.safetensors       and ``latents_flip`` when built with include_flips
    ...
    index.json                    written last: the cache is complete once it exists

Shard ``i`` holds items ``[i * shard_size, (i + 1) * shard_size)`` of the dataset. Each
file is written to a temporary name in the same folder and renamed into place, so a
shard is either absent or whole; leftover temporary files of an interrupted run are
deleted. With several processes, rank ``r`` of ``w`` encodes the shards ``i`` with
``i % w == r``; after a barrier, rank 0 calls :func:`finalize_latent_cache`, which checks
every shard and writes ``index.json``; after a second barrier every rank may open
:class:`LatentCacheDataset`. With one process :func:`build_latent_cache` finalizes itself.

A cache is identified by its *content* (the caller's fingerprint, the dataset's and the
encoder's ``fingerprint()``, count, latent shape, dtype, flips, seed). A complete cache
with the same content is reused without encoding anything; a cache with other content is
never overwritten: :class:`DataError` asks to delete the folder or choose another one.
An unfinished cache is resumed: valid shards are kept, shards that are truncated or
unreadable are encoded again. When reading, a truncated shard raises :class:`DataError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import struct
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader, Dataset, Subset

from noisevalue.errors import ConfigError, DataError

__all__ = [
    "build_latent_cache", "finalize_latent_cache", "inspect_latent_cache", "latent_cache_size",
    "LatentCacheDataset",
]

FORMAT, VERSION = "noisevalue-latent-cache", 1
INDEX, SPEC = "index.json", "spec.json"
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NUMPY: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
}


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _describe(component: Any) -> Any:
    fingerprint = getattr(component, "fingerprint", None)
    if callable(fingerprint):
        return _canonical(fingerprint())
    return {"type": f"{type(component).__module__}.{type(component).__qualname__}"}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_temps(root: Path, name: str = "*") -> None:
    for tmp in root.glob(f"{name}.tmp.*"):
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"latent cache file '{path}' is unreadable ({exc}); delete its folder"
        ) from exc


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of a safetensors file; ValueError if damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(length))
    meta = header.pop("__metadata__", None) or {}
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{size} bytes instead of {8 + length + end} (truncated?)")
    return header, meta, 8 + length


def _differs(root: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> DataError:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return DataError(
        f"latent cache '{root}' was built with different settings (differs in: "
        f"{', '.join(keys) or 'format'}); delete that folder or choose another cache directory"
    )


def _shard_ok(path: Path, spec: Mapping[str, Any], shard: Mapping[str, Any]) -> bool:
    """True if ``path`` is a whole shard of ``spec``; DataError if it has other content."""
    try:
        tensors, meta, _ = _read_header(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if meta.get("content_sha256") != spec["content_sha256"]:
        raise DataError(
            f"latent cache shard '{path}' was written with different settings; delete "
            f"'{path.parent}' or choose another cache directory"
        )
    latents = tensors.get("latents", {}).get("shape")
    return latents == [shard["count"], *spec["content"]["latent_shape"]] and meta.get(
        "start"
    ) == str(shard["start"])


@contextlib.contextmanager
def _flips_disabled(dataset: Any) -> Iterator[None]:
    """Encode unflipped images: turn a dataset's own ``random_flip`` off meanwhile."""
    flip = getattr(dataset, "random_flip", None)
    if flip:
        dataset.random_flip = False
    try:
        yield
    finally:
        if flip:
            dataset.random_flip = flip


def _make_spec(
    dataset: Any,
    encoder: Any,
    fingerprint: Mapping[str, Any] | None,
    shard_size: int,
    include_flips: bool,
    dtype: str,
    seed: int,
) -> dict[str, Any]:
    """The cache's content description (hashed) and its shard layout."""
    count = len(dataset)
    content = _canonical({
        "format": FORMAT, "version": VERSION, "fingerprint": dict(fingerprint or {}),
        "dataset": _describe(dataset), "encoder": _describe(encoder), "count": count,
        "num_classes": int(dataset.num_classes),
        "latent_shape": list(encoder.latent_shape(dataset.channels, dataset.image_size)),
        "dtype": dtype, "include_flips": bool(include_flips), "seed": int(seed),
    })  # fmt: skip
    shards = [
        {
            "file": f"shard_{i:05d}.safetensors",
            "start": start,
            "count": min(shard_size, count - start),
        }
        for i, start in enumerate(range(0, count, shard_size))
    ]
    return {
        "content": content,
        "content_sha256": _sha256(content),
        "shard_size": shard_size,
        "shards": shards,
    }


def _write_shard(
    path: Path, tensors: dict[str, torch.Tensor], spec: Mapping[str, Any], shard: Mapping[str, Any]
) -> None:
    expected = [shard["count"], *spec["content"]["latent_shape"]]
    if list(tensors["latents"].shape) != expected:
        raise DataError(
            f"the encoder returned latents of shape {list(tensors['latents'].shape)[1:]}, "
            f"but its latent_shape says {expected[1:]}"
        )
    meta = {"content_sha256": spec["content_sha256"], "start": str(shard["start"])}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _atomic_write(path, safetensors_save(tensors, metadata=meta))


def build_latent_cache(
    dataset: Dataset,
    encoder: Any,
    cache_dir: str | os.PathLike[str],
    *,
    fingerprint: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    shard_size: int = 8192,
    rank: int = 0,
    world_size: int = 1,
    include_flips: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Encode this rank's shards of ``dataset`` with ``encoder`` into ``cache_dir``.

    ``fingerprint``: anything else that determines the content (e.g. the recipe's data and
    encoder sections); ``include_flips`` also stores the latents of horizontally flipped
    images (``latents_flip``); ``dtype``: ``"float32"`` or ``"float16"`` storage; ``seed``
    seeds the encoder's posterior sampling per shard; ``device`` defaults to the encoder's;
    ``progress(done, total)`` is called with item counts of this rank. Returns the folder.
    With ``world_size > 1`` rank 0 must call :func:`finalize_latent_cache` after a barrier.
    Latents are bitwise reproducible for the same shard_size, batch_size and device (batch
    shape changes convolution rounding and the order of posterior samples), whatever the
    number of ranks.
    """
    if dtype not in _STORE_DTYPES:
        raise ConfigError(f"latent cache dtype: expected float32 or float16; got {dtype!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        if int(value) < low:
            raise ConfigError(f"latent cache {name}: expected a positive integer; got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"latent cache: rank {rank} is not in [0, world_size={world_size})")
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise DataError("cannot build a latent cache of an empty dataset")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)

    spec = _make_spec(dataset, encoder, fingerprint, shard_size, include_flips, dtype, seed)
    shards = spec["shards"]

    state = _state(root, spec)
    if state == "complete":
        return root  # complete and identical: reuse
    if state == "absent":
        _atomic_write(root / SPEC, json.dumps(spec, indent=1).encode())

    if device is None:
        device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    takes_generator = "generator" in inspect.signature(encoder.encode).parameters
    total = sum(s["count"] for s in shards[rank::world_size])
    done = 0
    with _flips_disabled(dataset):
        for number in range(rank, len(shards), world_size):
            shard = shards[number]
            path = root / shard["file"]
            _remove_temps(root, shard["file"])
            if path.exists():
                if _shard_ok(path, spec, shard):
                    done += shard["count"]
                    continue
                warnings.warn(
                    f"latent cache shard '{path}' is damaged; encoding it again", stacklevel=2
                )
                path.unlink()
            generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + number) % 2**63)
            tensors: dict[str, list[torch.Tensor]] = {
                "latents": [],
                "latents_flip": [],
                "labels": [],
            }
            subset = Subset(dataset, range(shard["start"], shard["start"] + shard["count"]))
            for x, y in DataLoader(subset, batch_size=batch_size, num_workers=num_workers):
                x = x.to(device)
                views = (
                    {"latents": x, "latents_flip": x.flip(-1)} if include_flips else {"latents": x}
                )
                for name, view in views.items():
                    with torch.no_grad():
                        z = (
                            encoder.encode(view, generator=generator)
                            if takes_generator
                            else encoder.encode(view)
                        )
                    tensors[name].append(z.detach().to("cpu", _STORE_DTYPES[dtype]))
                tensors["labels"].append(torch.as_tensor(y, dtype=torch.long).reshape(-1))
                done += len(x)
                if progress is not None:
                    progress(done, total)
            _write_shard(path, {k: torch.cat(v) for k, v in tensors.items() if v}, spec, shard)
    if world_size == 1:
        finalize_latent_cache(root)
    return root


def _state(root: Path, spec: Mapping[str, Any]) -> str:
    """``complete``, ``partial`` (being built: spec.json without index.json) or ``absent``
    for a cache of ``spec`` in ``root``; DataError when ``root`` holds another one."""
    index = _read_json(root / INDEX)
    if index is not None:
        if index.get("content_sha256") != spec["content_sha256"]:
            raise _differs(root, index.get("content", {}), spec["content"])
        return "complete"
    previous = _read_json(root / SPEC)
    if previous is None:
        return "absent"
    if previous.get("content_sha256") != spec["content_sha256"]:
        raise _differs(root, previous.get("content", {}), spec["content"])
    if previous.get("shard_size") != spec["shard_size"]:
        raise DataError(
            f"the unfinished latent cache '{root}' uses shard_size={previous.get('shard_size')}; "
            "resume it with the same shard_size or delete that folder"
        )
    return "partial"


def inspect_latent_cache(
    dataset: Dataset,
    encoder: Any,
    cache_dir: str | os.PathLike[str],
    *,
    fingerprint: Mapping[str, Any] | None = None,
    shard_size: int = 8192,
    include_flips: bool = False,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[str, int, int]:
    """What :func:`build_latent_cache` with these arguments would find in ``cache_dir``,
    read without creating or encoding anything: ``(state, shards present, shards)`` with
    state ``complete`` (reused as it is), ``partial`` (resumed) or ``absent``. Raises
    :class:`DataError` as it would: the folder holds a cache with other content."""
    root = Path(cache_dir)
    spec = _make_spec(dataset, encoder, fingerprint, shard_size, include_flips, dtype, seed)
    state = _state(root, spec) if root.is_dir() else "absent"
    present = sum((root / s["file"]).is_file() for s in spec["shards"]) if state != "absent" else 0
    return state, present, len(spec["shards"])


def latent_cache_size(cache_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """``(items, bytes)`` of a complete cache: its item count and the bytes of its files
    (shards, spec.json, index.json)."""
    root = Path(cache_dir)
    index = _read_json(root / INDEX)
    if index is None:
        raise DataError(f"latent cache '{root}' is not complete (no index.json)")
    files = [root / INDEX, root / SPEC, *(root / s["file"] for s in index["shards"])]
    return int(index["content"]["count"]), sum(f.stat().st_size for f in files if f.is_file())


def finalize_latent_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Check that every shard exists and is whole, then write ``index.json`` (rank 0 only).

    Idempotent. Raises :class:`DataError` naming missing or damaged shards.
    """
    root = Path(cache_dir)
    if _read_json(root / INDEX) is not None:
        return root
    spec = _read_json(root / SPEC)
    if spec is None:
        raise DataError(f"'{root}' holds no latent cache being built; run build_latent_cache first")
    bad = [
        s["file"]
        for s in spec["shards"]
        if not (root / s["file"]).exists() or not _shard_ok(root / s["file"], spec, s)
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DataError(
            f"latent cache '{root}' is incomplete: {len(bad)} shard(s) missing or damaged "
            f"({shown}); run build_latent_cache again on every rank"
        )
    _atomic_write(root / INDEX, json.dumps({**spec, "complete": True}, indent=1).encode())
    _remove_temps(root)
    return root


class LatentCacheDataset(Dataset):
    """A finished latent cache, read through memory maps (the OS page cache is shared by
    all processes on a machine, so ImageNet-sized caches need not fit in each one's RAM).

    ``__getitem__(i)`` returns ``(latent float32 [C, H, W], label int)`` like an
    :class:`~noisevalue.interfaces.ImageDataset`, except that values are latents, not
    ``[-1, 1]`` pixels. With ``random_flip`` (needs a cache built with include_flips) it
    returns the flipped image's latent with probability 0.5 (torch's global RNG).
    Attributes: ``num_classes``, ``channels``, ``image_size``, ``latent_shape``,
    ``include_flips``, ``labels`` (long ``[N]``, in memory), ``fingerprint``, ``content``.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], random_flip: bool = False) -> None:
        self.root = Path(cache_dir)
        index = _read_json(self.root / INDEX)
        if index is None:
            what = "does not exist" if not self.root.is_dir() else "is not complete (no index.json)"
            raise DataError(f"latent cache '{self.root}' {what}; build it with build_latent_cache")
        content = index.get("content", {})
        if (content.get("format"), content.get("version")) != (FORMAT, VERSION):
            raise DataError(f"'{self.root}' is not a latent cache of this noisevalue version")
        self.content, self.fingerprint = content, content["fingerprint"]
        self.latent_shape = tuple(content["latent_shape"])
        self.channels, self.image_size = self.latent_shape[0], self.latent_shape[1]
        self.num_classes = int(content["num_classes"])
        self.include_flips = bool(content["include_flips"])
        if random_flip and not self.include_flips:
            raise DataError(
                f"latent cache '{self.root}' was built without include_flips; "
                "rebuild it with flips to use random_flip"
            )
        self.random_flip = bool(random_flip)
        self._shards: list[tuple[Path, int, dict[str, Any], int]] = []
        for shard in index["shards"]:
            path = self.root / shard["file"]
            try:
                tensors, meta, start = _read_header(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"latent cache shard '{path}' is missing or damaged ({exc}); delete "
                    f"'{self.root / INDEX}' and run build_latent_cache again to re-encode it"
                ) from exc
            if meta.get("content_sha256") != index["content_sha256"]:
                raise DataError(f"latent cache shard '{path}' belongs to another cache")
            self._shards.append((path, start, tensors, int(shard["start"])))
        self._starts = np.array([s[3] for s in self._shards], dtype=np.int64)
        self._count = int(content["count"])
        self._maps: dict[int, np.memmap] = {}  # one map (one file descriptor) per shard
        self.labels = torch.from_numpy(
            np.concatenate([self._read(i, "labels") for i in range(len(self._shards))])
        ).long()

    def _read(self, shard: int, name: str) -> np.ndarray:
        """A whole tensor of a shard, read into memory (used for the small labels)."""
        path, start, tensors, _ = self._shards[shard]
        info = tensors[name]
        dtype = _NUMPY[info["dtype"]]
        begin, end = info["data_offsets"]
        data = np.fromfile(
            path, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        )
        return data.reshape(info["shape"])

    def _array(self, shard: int, name: str) -> np.ndarray:
        """A memory-mapped, read-only view of tensor ``name`` of ``shard``."""
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self._shards[shard][0], dtype=np.uint8, mode="r")
        _, start, tensors, _ = self._shards[shard]
        info = tensors[name]
        return np.ndarray(
            tuple(info["shape"]),
            dtype=_NUMPY[info["dtype"]],
            buffer=self._maps[shard],
            offset=start + info["data_offsets"][0],
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # reopened lazily in worker processes
        return state

    def __len__(self) -> int:
        return self._count

    def get_batch(
        self, indices: Sequence[int] | torch.Tensor | np.ndarray, flip_mask: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents float32 ``[n, C, H, W]`` and labels long ``[n]`` of ``indices``.

        ``flip_mask`` (bool ``[n]``) picks the flipped image's latent where True.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self._count):
            raise IndexError(f"latent cache index out of range [0, {self._count})")
        flips = (
            None
            if flip_mask is None
            else torch.as_tensor(flip_mask, dtype=torch.bool).reshape(-1).cpu().numpy()
        )
        if flips is not None and flips.any() and not self.include_flips:
            raise DataError(f"latent cache '{self.root}' was built without include_flips")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((idx.size, *self.latent_shape), dtype=np.float32)
        for shard in np.unique(shard_of):
            in_shard = shard_of == shard
            parts = (
                [("latents", in_shard)]
                if flips is None
                else [("latents", in_shard & ~flips), ("latents_flip", in_shard & flips)]
            )
            for name, rows in parts:
                if rows.any():
                    out[rows] = self._array(int(shard), name)[idx[rows] - self._starts[shard]]
        return torch.from_numpy(out), self.labels[torch.from_numpy(idx)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip = [bool(torch.rand(()) < 0.5)] if self.random_flip else None
        x, y = self.get_batch([index], flip)
        return x[0], int(y[0])
