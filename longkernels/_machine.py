"""What machine this is, for `longkernels info` and benchmark result names."""
import platform


def _cpuinfo(key: str):
    """The value of the first ``key`` line of /proc/cpuinfo, or None (no such file or line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector extension the CPU reports that our kernels use ("avx512" or "avx2"),
    else "": CPU kernels' speed depends on it, so CPU benchmark results are named with it."""
    flags = set((_cpuinfo("flags") or "").split())
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else ""


def slug(text: str) -> str:
    """``text`` in lower case with every run of other characters than letters and digits made one dash."""
    import re
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
