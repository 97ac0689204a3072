"""What machine this is, for `longkernels info` and benchmark result names."""
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector extension the CPU reports that our kernels use ("avx512" or "avx2"),
    else "": CPU kernels' speed depends on it, so CPU benchmark results are named with it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    if "avx512f" in flags:
                        return "avx512"
                    return "avx2" if {"avx2", "fma"} <= flags else ""
    except OSError:
        pass
    return ""
