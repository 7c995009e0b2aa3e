"""On-disk activation stores: harvest residual-stream activations once, stream them many times.

A store is a folder::

    manifest.json              # what is in the folder; the only source of truth
    shard_00000.acts.npy       # [n, d_model] activations (bfloat16 kept as uint16 bit patterns)
    shard_00000.doc_id.npy     # [n] int64
    shard_00000.position.npy   # [n] int32, index in the model context (0 = attention sink / BOS)
    shard_00000.token_id.npy   # [n] int32
    shard_00000.doc_position.npy  # [n] int32, optional
    ...

The package follows that folder: ``format`` (manifest, dtypes, layout checks), ``writer`` (``StoreWriter``),
``reader`` (``ActivationStore`` and its norm statistics) and ``shuffle`` (the bounded shuffle buffer that the
reader and on-the-fly harvesting share).
"""

from .format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TIMESTAMP_KEYS,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
)
from .reader import ActivationStore, massive_dims
from .shuffle import ShuffleBuffer
from .writer import StoreWriter

__all__ = [
    "ActivationStore",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "ShuffleBuffer",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriter",
    "TIMESTAMP_KEYS",
    "massive_dims",
]
