"""What CPU this is, for every speed figure: its model name and the vector ISA that decides how fast the encoder
runs (AVX2, AVX-512, AVX512-BF16, AMX). Read from /proc/cpuinfo (Linux); elsewhere `platform` says what it can."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# (cpuinfo flag, name), fastest last: the name of the best one present is the ISA summary
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name or platform.machine(), flags


def vector_isa() -> list[str]:
    """The vector extensions present, e.g. ['AVX2', 'AVX-512', 'AVX512-BF16'] (no 'AMX' on that CPU)."""
    flags = _cpuinfo()[1]
    return [name for flag, name in ISA_FLAGS if flag in flags]


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: with one of these set, bf16 is not fast
_NO_BF16_CAPS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_cap() -> str | None:
    """The ISA that ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) caps oneDNN at, if set: e.g. AVX2 to
    run torch as on an AVX2-only CPU (with ATEN_CPU_CAPABILITY=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip().upper() not in ("ALL", "DEFAULT") else None


def has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (and oneDNN not capped below it): bf16 convolutions are 2-3x faster than fp32 there."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpuinfo()[1]) and onednn_cap() not in _NO_BF16_CAPS


def describe() -> str:
    """One line for tables: 'AMD EPYC, 2 cores, AVX2 + AVX-512 + AVX512-BF16 (no AMX)'."""
    isa = vector_isa()
    missing = "" if "AMX" in isa else " (no AMX)"
    capped = f"; oneDNN capped at {onednn_cap()}" if onednn_cap() else ""
    return f"{_cpuinfo()[0]}, {os.cpu_count()} cores, {' + '.join(isa) or 'no AVX2'}{missing}{capped}"
