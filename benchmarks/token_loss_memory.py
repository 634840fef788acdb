"""Peak memory of a token-level distillation loss, forward + backward, three ways (issue 12, part 3).

- ``naive``: both models' logits from their lm_heads, cast whole to fp32, softmaxes, the divergence at every
  position, masked, summed, backward (TRL's GKD loss is written this way);
- ``chunked``: the same logits (in the models' dtype), then the registered loss (``hfdistill.losses.build``), which
  casts to fp32 and recomputes chunk by chunk;
- ``fused``: :func:`hfdistill.losses.tokens.fused_linear_token_loss` from the final hidden states and the lm_head
  weights, never materialising the logits.

Every variant starts from the same inputs (the students' and teachers' final hidden states and lm_head weights,
the student's requiring grad) and ends with the gradients of the student's hidden states and lm_head weight, so
the three do the same work, lm_head included. Each runs in a fresh subprocess; the peak is measured above the
memory held once the inputs exist: on CPU the process's resident-set high-water mark (``ru_maxrss``, which sees
every allocation torch makes), on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/token_loss_memory.py                 # batch 4 x 1024 tokens, vocabulary 32000
    python benchmarks/token_loss_memory.py --tiny          # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "token_loss_memory_cpu.md"
VARIANTS = ("naive", "chunked", "fused")
FULL = dict(batch=4, seq=1024, vocab=32000, hidden=1024, teacher_hidden=2048)
TINY = dict(batch=2, seq=64, vocab=1000, hidden=32, teacher_hidden=48)


def _tokens_module():
    """hfdistill.losses.tokens with only what it imports (errors, losses.common, losses.registry).

    The package's ``__init__`` imports the trainer and transformers; a fresh process per variant starts in about
    2 s instead of 6 s this way, and its baseline memory is smaller. In a process that already imported hfdistill
    this is the ordinary module.
    """
    if "hfdistill" not in sys.modules:
        for name, path in (("hfdistill", ROOT / "hfdistill"), ("hfdistill.losses", ROOT / "hfdistill" / "losses")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    import hfdistill.losses.tokens as tokens

    return tokens


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args) -> dict:
    """One variant in this process: build the inputs, measure forward + backward, return the row."""
    import torch
    import torch.nn.functional as F

    tokens = _tokens_module()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    b, t, v = args.batch, args.seq, args.vocab
    hs = (torch.randn(b, t, args.hidden, device=device) * 0.5).to(dtype).requires_grad_(True)
    ws = (torch.randn(v, args.hidden, device=device) / args.hidden**0.5).to(dtype).requires_grad_(True)
    ht = (torch.randn(b, t, args.teacher_hidden, device=device) * 0.5).to(dtype)
    wt = (torch.randn(v, args.teacher_hidden, device=device) / args.teacher_hidden**0.5).to(dtype)
    labels = torch.randint(0, v, (b, t), device=device)
    labels[:, : t // 8] = -100  # a prompt
    loss_module = tokens.TOKEN_LOSSES[args.kind](chunk_size=args.chunk_size)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    if args.variant == "naive":
        zs = F.linear(hs, ws)  # [B, T, V] model dtype
        with torch.no_grad():
            zt = F.linear(ht, wt)
        rows = loss_module.row_loss(zs[:, :-1].reshape(-1, v).float(), zt[:, :-1].reshape(-1, v).float())
        mask = labels[:, 1:].reshape(-1) != -100
        loss = (rows * mask).sum() / mask.sum()
    elif args.variant == "chunked":
        zs = F.linear(hs, ws)
        with torch.no_grad():
            zt = F.linear(ht, wt)
        loss = loss_module(zs, zt, labels=labels)
    else:
        loss = tokens.fused_linear_token_loss(hs, ws, ht, wt, args.kind, labels=labels, chunk_size=args.chunk_size)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss: KiB on Linux
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "peak_bytes": int(max(peak, 0)), "seconds": round(seconds, 3),
            "loss": float(loss), "grad_norm": float(hs.grad.float().norm()),
            "weight_grad_norm": float(ws.grad.float().norm())}


def _sizes(args) -> dict:
    return {k: getattr(args, k) for k in FULL}


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def write_report(path: Path, rows: list[dict], args, command: str) -> None:
    naive = next(r for r in rows if r["variant"] == "naive")
    size = _sizes(args)
    n_tokens = args.batch * (args.seq - 1)
    copy_mib = n_tokens * args.vocab * 4 / 2**20
    chunk = args.chunk_size if args.chunk_size is not None else max(1, 2**24 // args.vocab)
    lines = [
        "# Token-loss memory: naive vs chunked vs fused linear",
        "",
        f"Machine: {_machine(args.device)}",
        f"Date: {datetime.date.today().isoformat()}",
        f"Command: `{command}`",
        "",
        ("Tiny run (plumbing check, not a measurement). " if args.tiny else "")
        + f"Size: batch {size['batch']} x sequence {size['seq']}, vocabulary {size['vocab']}, student hidden "
        f"{size['hidden']}, teacher hidden {size['teacher_hidden']}, {args.dtype} models on {args.device}, loss "
        f"`{args.kind}`, chunk size {chunk} tokens"
        f"{' (the default, 2**24 // vocabulary)' if args.chunk_size is None else ''}. "
        f"One fp32 copy of one model's logits is {copy_mib:.1f} MiB.",
        "",
        "Peak memory of forward + backward above the inputs (hidden states and lm_head weights), each variant in a "
        "fresh process: " + ("the resident-set high-water mark (`ru_maxrss`)." if args.device == "cpu"
                             else "`torch.cuda.max_memory_allocated`.") + " All three end with the gradients of the "
        "student's hidden states and lm_head weight (the weight's gradient, "
        f"{args.vocab * args.hidden * 4 / 2**20:.1f} MiB in fp32, is in every row).",
        "",
        "| variant | peak MiB | vs naive | seconds | loss | grad norm (hidden) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["peak_bytes"] / naive["peak_bytes"] if naive["peak_bytes"] else float("nan")
        lines.append(f"| {r['variant']} | {r['peak_bytes'] / 2**20:.1f} | {ratio:.2f}x | {r['seconds']:.2f} | "
                     f"{r['loss']:.6f} | {r['grad_norm']:.6f} |")
    lines += [
        "",
        "- naive: `lm_head` of both models, whole [B, T-1, V] logits cast to fp32, softmaxes, divergence, mask, "
        "backward (autograd keeps the fp32 log-softmaxes of the whole sequence); the same per-token divergence code "
        "as the other two (`row_loss` of the registered loss), applied to every position at once.",
        "- chunked: the same logits in the models' dtype, then `hfdistill.losses.build(kind)` (fp32 per chunk of "
        "counted positions, recomputed in backward). Its peak includes both models' whole logits and the "
        "gradient of the student's (the inputs of any loss on logits; fp32 here because the models are, half the "
        "size with bf16 models).",
        "- fused: `fused_linear_token_loss` from hidden states and lm_head weights (logits, loss and gradients per "
        "chunk; no [N, V] tensor).",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.json:
        raw = {"size": size, "tiny": args.tiny, "kind": args.kind, "dtype": args.dtype, "device": args.device,
               "chunk_size": chunk, "rows": rows}
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help=f"a seconds-long run: {TINY}")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--kind", default="forward_kl", help="the token loss (forward_kl, jsd, ...)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk (default: the losses' default, 2**24 // vocabulary)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help=f"the report (default {DEFAULT_OUT.relative_to(ROOT)}, "
                                                    "or ..._cuda.md on cuda)")
    parser.add_argument("--json", default=None, help="also write the raw rows to this JSON file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the worker's
    args = parser.parse_args(argv)
    base = TINY if args.tiny else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.variant:  # a worker: one variant, one JSON line
        print(json.dumps(run_variant(args)))
        return 0
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for variant in VARIANTS:
        result = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True,
                                text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    out = Path(args.out) if args.out else DEFAULT_OUT.with_name(f"token_loss_memory_{args.device}.md")
    shown, skip = [], False
    for arg in argv:  # the command as run, without --out (the report says where it is)
        if skip or arg in ("--out", "--json") or arg.startswith(("--out=", "--json=")):
            skip = arg in ("--out", "--json")
            continue
        shown.append(arg)
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    write_report(out, rows, args, " ".join([*threads, "python benchmarks/token_loss_memory.py", *shown]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
