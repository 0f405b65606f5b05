"""Modelled (not measured) GPU time of the fused 4-bit matmul, from bytes and FLOPs.

H100 ceilings measured on the lent machine (../shared, device notes): ~3.0 TB/s HBM, ~800 TFLOP/s
bf16. time = max(bytes / bandwidth, flops / peak): a roofline bound, no occupancy or launch
effects. Prints a Markdown table for docs/benchmarks.md.

    python scripts/kernel_model.py
"""

BW, PEAK = 3.0e12, 800e12
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (out N, in K)
MS = [1, 16, 128, 512, 2048, 8192]


def bytes_fused(m, n, k, blocksize=64, nested_blocksize=256):
    """What our kernel reads and writes: codes, 8-bit absmax codes and their fp32 scales (decoded
    in the kernel), x and y (bf16). The 1 KiB dynamic map is cached."""
    nested = -(-(n * k // blocksize) // nested_blocksize) * 4
    return n * k // 2 + n * k // blocksize + nested + 2 * m * k + 2 * m * n


def bytes_must(m, n, k, blocksize=64):
    """What any kernel must read/write: codes, 8-bit absmax codes, x, y (bf16)."""
    return n * k // 2 + n * k // blocksize + 2 * m * k + 2 * m * n


def bytes_dense(m, n, k):
    return 2 * n * k + 2 * m * k + 2 * m * n


def main():
    print("| N x K | M | bytes must (MB) | fused model (us) | dense bf16 model (us) | fused / dense | bound |")
    print("|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        for m in MS:
            flops = 2 * m * n * k
            t_fused = max(bytes_fused(m, n, k) / BW, flops / PEAK)
            t_dense = max(bytes_dense(m, n, k) / BW, flops / PEAK)
            bound = "memory" if bytes_fused(m, n, k) / BW > flops / PEAK else "compute"
            print(f"| {n}x{k} | {m} | {bytes_must(m, n, k) / 1e6:.1f} | {t_fused * 1e6:.1f} | {t_dense * 1e6:.1f} | "
                  f"{t_fused / t_dense:.2f} | {bound} |")


if __name__ == "__main__":
    main()
