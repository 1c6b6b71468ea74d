"""The benchmark's results as markdown tables and one plot (from the dict `bench/run.py`
writes as JSON: {"clip": ..., "siglip": ..., "gemma": ...}, any may be missing)."""

from __future__ import annotations

from pathlib import Path

GOALS = {"startup_ratio": 100.0, "noop_s": 2.0, "gemma_cpu_head_rss_mb": 600.0}
MIB = 2**20
CONTRASTIVE = {"clip": "CLIP", "siglip": "SigLIP"}  # the image-and-text benches (bench/clip_vit_b32.py --model)


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def goals(results: dict) -> list[dict]:
    """Each goal of issue #8, what was reached, and whether that meets it."""
    out = []
    for model, r in results.items():
        # Start-up: the modes a user starts with (the lazy ones); preload is start-up traded for speed.
        default = [s for s in r["startup"] if s["lm_head"] in ("-", "cpu", "tpu-lazy-8")]
        worst = min(default, key=lambda s: s["ratio"])
        out.append({"goal": f"{model}: start-up >= {GOALS['startup_ratio']:.0f}x start-up patching",
                    "reached": f"{worst['ratio']:.0f}x at worst ({worst['backend']}, head {worst['lm_head']})",
                    "met": worst["ratio"] >= GOALS["startup_ratio"]})
        out.append({"goal": f"{model}: no-op rebuild < {GOALS['noop_s']:.0f} s",
                    "reached": f"{r['build']['noop_s']:.2f} s", "met": r["build"]["noop_s"] < GOALS["noop_s"]})
    if "gemma" in results:
        for s in results["gemma"]["steady"]:
            if s["lm_head"] == "cpu":
                mb = s["peak_rss_mib"] * MIB / 1e6
                out.append({"goal": f"gemma: runner peak RSS with the cpu head < {GOALS['gemma_cpu_head_rss_mb']:.0f} MB"
                                    f" ({s['backend']} backend)",
                            "reached": f"{mb:.0f} MB", "met": mb < GOALS["gemma_cpu_head_rss_mb"]})
    return out


def markdown(results: dict) -> str:
    lines = []
    lines += ["### Goals", ""] + _table(["goal", "reached", "met"],
                                        [[g["goal"], g["reached"], "yes" if g["met"] else "**no**"]
                                         for g in goals(results)]) + [""]
    lines += ["### Build", ""]
    rows = []
    for model, r in results.items():
        b = r["build"]
        rows.append([model, f"{r['checkpoint_s']:.1f}", f"{b['cold_s']:.1f}", f"{b['noop_s']:.2f}",
                     f"{b['knob_s']:.1f} ({b['knob_layers_redone']} of {b['layers']} redone)",
                     f"{b['tensor_s']:.1f} ({b['tensor_layers_redone']} of {b['layers']} redone)",
                     f"{r['bundle_bytes'] / MIB:.0f} MiB, {r['bundle_files']} files"])
    lines += _table(["model", "checkpoint s (once)", "cold s", "no-op s", "one knob s", "one tensor s", "bundle"],
                    rows) + [""]
    lines += [f"Knob and tensor: {model}: `{r['build']['knob']}`; `{r['build']['tensor']}` negated."
              for model, r in results.items()] + [""]
    lines += ["### Start-up (bundle open to ready, median, in-process)", ""]
    rows = [[model, s["backend"], s["lm_head"], f"{s['setup_ms']:.1f}", f"{s['baseline_ms']:.0f}",
             f"**{s['ratio']:.0f}x**"] for model, r in results.items() for s in r["startup"]]
    lines += _table(["model", "backend", "lm head", "setup ms", "start-up patching ms", "ratio"], rows) + [""]
    lines += ["Start-up patching = quantize, encode and patch every linear (and head tile, or the int8 "
              "table for a CPU head) from the checkpoint, then the same start-up.", ""]
    for model in [m for m in CONTRASTIVE if m in results]:
        lines += [f"### {CONTRASTIVE[model]} steady state on this machine (median of 2 rounds after the first)", ""]
        steady = results[model]["steady"]
        keys = [k for k in steady["cpu"] if k.startswith(("image_ms", "text_ms"))]
        rows = [[b, *[f"{s[k]:.0f}" for k in keys], f"{s['peak_rss_mib']:.0f}",
                 f"{s.get('image_cosine_mean', 1.0):.5f}", f"{s.get('text_cosine_mean', 1.0):.5f}"]
                for b, s in steady.items()]
        lines += _table(["backend", *keys, "peak RSS MiB", "image cos", "text cos"], rows) + [""]
    if "gemma" in results:
        lines += ["### Gemma steady state on this machine (16-token prompt, median round of 2 after the first)", ""]
        rows = [[s["backend"], s["lm_head"], f"{s['prefill_ms']:.0f}", f"{s['ms_per_token']:.1f}",
                 f"{s['peak_rss_mib']:.0f}"] for s in results["gemma"]["steady"]]
        lines += _table(["backend", "lm head", "prefill ms", "ms per token", "peak RSS MiB"], rows) + [""]
    lines += ["### Pi 5 + Coral USB: the model (bench/pi5_coral.yaml) on the measured work", "",
              "Linears only for Gemma (the LM head is below); the bundle's own template batches.", ""]
    rows = []
    for model, r in results.items():
        for run, p in r["pi5"].items():
            if "work" not in p:
                continue
            w, e = p["work"], p["estimate"]
            rows.append([model, run, f"{w['param_bytes_uploaded'] / 1e6:.1f}", w["tpu_invocations"],
                         f"{w['tpu_macs'] / 1e9:.2f}", f"{w['cpu_macs'] / 1e9:.3f}", f"{e['total_s']:.3f}",
                         f"{e['of_which_parameter_upload_s']:.3f}", f"{e['cpu_s']:.3f}"])
    lines += _table(["model", "run", "MB uploaded", "TPU invokes", "TPU GMAC", "CPU GMAC", "estimate s",
                     "of it USB upload s", "of it CPU s"], rows) + [""]
    for model, r in results.items():
        best = {run: sum(b["s_best"] for b in p["recommend"]["batches"]) + p["estimate"]["cpu_s"]
                for run, p in r["pi5"].items() if "recommend" in p}
        lines += [f"{model}, estimated with each shape's best template batch: "
                  + ", ".join(f"{run} {s:.3f} s" for run, s in best.items()) + "."]
    for model in [m for m in CONTRASTIVE if m in results]:
        p = results[model]["pi5"]
        per = {k: v["estimate"]["per_input_s"] for k, v in p.items() if k.startswith("image")}
        lines += [f"{CONTRASTIVE[model]} image, estimated per image: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in per.items())
                  + f"; the reference project: {p['reference']['clip_image_s']} s per CLIP ViT-B/32 image "
                  "(batch-4 templates)."]
    if "gemma" in results:
        p = results["gemma"]["pi5"]
        d = p["decode"]
        lines += [f"Gemma decode, estimated per token: decoder {d['estimate']['total_s'] * 1e3:.0f} ms + head "
                  + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in d["head_s"].items()) + ".",
                  f"Gemma set-up, estimated: ours {p['setup_s']['cpu_head']['ours']:.2f} s (cpu head), "
                  f"{p['setup_s']['tpu_head']['ours']:.2f} s (tpu-lazy head); start-up patching "
                  f"{p['setup_s']['cpu_head']['startup_patching']:.1f} s / "
                  f"{p['setup_s']['tpu_head']['startup_patching']:.1f} s; the reference project: "
                  f"{p['reference']['gemma_setup_cpu_head_s']} s / {p['reference']['gemma_setup_tpu_head_s']} s."]
    lines += ["", "### Recommendations from the model", ""]
    rows = []
    for model, r in results.items():
        for run, p in r["pi5"].items():
            if "recommend" not in p:
                continue
            rec = p["recommend"]
            for b in rec["batches"]:
                rows.append([model, run, b["shape"], b["rows_per_call"], b["batch_now"], f"{b['s_now']:.3f}",
                             b["batch_best"], f"{b['s_best']:.3f}"])
    lines += _table(["model", "run", "shape", "rows per call", "batch now", "s now", "batch best", "s best"],
                    rows) + [""]
    for model, r in results.items():
        for run, p in r["pi5"].items():
            if "recommend" in p:
                rec = p["recommend"]
                line = (f"- {model} {run}: at the best batches, {len(rec['faster_on_cpu'])} of "
                        f"{rec['of_tpu_linears']} TPU linears would still run faster on the CPU "
                        f"(saving {rec['seconds_saved']:.3f} s more)")
                if rec["head"]:
                    line += (f"; LM head: TPU tiles {rec['head']['tpu_tiles_s'] * 1e3:.0f} ms, CPU int8 "
                             f"{rec['head']['cpu_int8_s'] * 1e3:.0f} ms -> {rec['head']['faster']}")
                lines.append(line)
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Start-up against start-up patching, build times, steady-state forwards, and the Pi 5 model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    a = axes[0, 0]
    rows = [(f"{m}\n{s['backend']}\n{s['lm_head']}", s) for m, r in results.items() for s in r["startup"]]
    x = np.arange(len(rows))
    a.bar(x - 0.2, [s["setup_ms"] for _, s in rows], 0.4, label="bundle (ours)")
    a.bar(x + 0.2, [s["baseline_ms"] for _, s in rows], 0.4, label="start-up patching")
    for i, (_, s) in enumerate(rows):
        a.text(i, s["baseline_ms"], f"{s['ratio']:.0f}x", ha="center", va="bottom", fontsize=7)
    a.set_yscale("log")
    a.set_ylabel("ms")
    a.set_xticks(x, [label for label, _ in rows], fontsize=6)
    a.set_title("start-up: bundle open to ready")
    a.legend(fontsize=8)

    b = axes[0, 1]
    models = list(results)
    keys = [("cold_s", "cold"), ("noop_s", "no-op"), ("knob_s", "one knob"), ("tensor_s", "one tensor")]
    x = np.arange(len(keys))
    for i, m in enumerate(models):
        b.bar(x + (i - 0.5) * 0.4, [results[m]["build"][k] for k, _ in keys], 0.4, label=m)
    b.set_xticks(x, [label for _, label in keys])
    b.set_yscale("log")
    b.set_ylabel("s")
    b.set_title("build")
    b.legend(fontsize=8)

    c = axes[1, 0]
    bars = []
    if "clip" in results:
        for backend, s in results["clip"]["steady"].items():
            for k in s:
                if k.startswith(("image_ms", "text_ms")):
                    bars.append((f"clip {backend}\n{k}", s[k]))
    if "gemma" in results:
        for s in results["gemma"]["steady"]:
            bars.append((f"gemma {s['backend']}\n{s['lm_head'].replace('+', chr(10) + '+')}\nms/token",
                         s["ms_per_token"]))
    c.bar(range(len(bars)), [v for _, v in bars], color="tab:green")
    c.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=5, rotation=90)
    c.set_yscale("log")
    c.set_ylabel("ms")
    c.set_title("steady state on this machine")

    d = axes[1, 1]
    runs = [(f"{m}\n{run}", p["estimate"]) for m, r in results.items() for run, p in r["pi5"].items()
            if "estimate" in p]
    x = np.arange(len(runs))
    upload = np.array([e["of_which_parameter_upload_s"] for _, e in runs])
    tpu = np.array([e["tpu_s"] for _, e in runs]) - upload
    cpu = np.array([e["cpu_s"] for _, e in runs])
    d.bar(x, upload, label="parameter upload (USB)")
    d.bar(x, tpu, bottom=upload, label="TPU invokes, MACs, row quantization")
    d.bar(x, cpu, bottom=upload + tpu, label="CPU")
    if "clip" in results:
        d.axhline(results["clip"]["pi5"]["reference"]["clip_image_s"], color="k", ls="--", lw=1,
                  label="reference: CLIP s per image")
    d.set_xticks(x, [label for label, _ in runs], fontsize=7)
    d.set_ylabel("s (estimated; stacked, so linear)")
    d.set_title("Pi 5 + Coral USB model, per run")
    d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The goals for the runner against every peer: (model, work) -> the highest ratio any round may reach.
PEER_GOALS = {("gemma", "prefill 256"): 1.0, ("gemma", "decode"): 1.2, ("gemma", "decode, sampling"): 1.3}
# The peers' works that bench/routes.py models on the Pi too: peer work -> (model, routes workload).
PI_WORKLOADS = {("clip", "1 image"): "1 image", ("clip", "8 images"): "8 images",
                ("gemma", "prefill 256"): "prefill, 256 tokens", ("gemma", "decode"): "decode, 1 token"}


def peers_markdown(peers: dict) -> str:
    """The runner against each peer on this machine, and what that makes of a Pi 5 with and
    without the Coral (bench/pi5_coral.yaml, bench/routes.py)."""
    if not peers:
        return ""
    from bench.routes import measure
    from prepare.costmodel import Device

    lines = ["### Against the CPU runtimes a user would pick (this machine, one thread a side, rounds in "
             "alternating order)", "",
             "Ratio: the median of the rounds' runner / peer, and its range over the rounds; a goal is met only "
             "when the whole range is under it.", ""]
    rows = [[model, work, f"{p['runner_ms']:.1f}", peer, f"{q['ms']:.1f}", f"**{q['ratio']:.2f}**" + (
             f" ({q['ratio_min']:.2f}-{q['ratio_max']:.2f}, {q['rounds']} rounds)" if "ratio_max" in q else "")]
            for model, works in peers.items() for work, p in works.items()
            for peer, q in p.items() if peer != "runner_ms"]
    lines += _table(["model", "work", "runner ms (cpu)", "peer", "peer ms", "ratio (runner / peer)"], rows) + [""]
    goals = [[f"{model} {work}: runner / {peer} <= {goal}", f"{q['ratio_max']:.2f} at most",
              "yes" if q["ratio_max"] <= goal else "**no**"]
             for (model, work), goal in PEER_GOALS.items() for peer, q in peers.get(model, {}).get(work, {}).items()
             if peer != "runner_ms" and "ratio_max" in q]
    if goals:
        lines += _table(["goal against the peers", "reached (every round)", "met"], goals) + [""]
    device, routes = Device.load(), measure()["models"]
    f = device.host_to_pi_cpu
    lines += ["### On a Pi 5, modelled: the runner on its CPU, with the Coral (`--route auto`), and the peer", "",
              f"Runner and peer: this machine's times x {f} (`host_to_pi_cpu`; this machine's ratio carried to the "
              "Pi). With the Coral: the CPU time, less the linears' modelled CPU time, plus their modelled "
              "`--route auto` time (bench/routes.py, `batch: auto` templates).", ""]
    rows = []
    for (model, work), label in PI_WORKLOADS.items():
        if work not in peers.get(model, {}):
            continue
        p = peers[model][work]
        r = routes[model]["workloads"][label]["auto"]
        cpu = p["runner_ms"] * f
        coral = max(0.0, cpu - r["cpu_only_ms"] + r["auto_ms"])
        best_peer = min((peer for peer in p if peer != "runner_ms"), key=lambda peer: p[peer]["ms"])
        peer_ms = p[best_peer]["ms"] * f
        times = {"runner, CPU": cpu, "runner + Coral": coral, best_peer: peer_ms}
        fastest = min(times, key=times.get)
        second = sorted(times.values())[1]
        rows.append([model, work, f"{cpu:.0f}", f"{coral:.0f}", f"{best_peer} {peer_ms:.0f}",
                     f"{fastest} ({second / times[fastest]:.2f}x ahead)"])
    lines += _table(["model", "work", "runner CPU ms", "runner + Coral ms", "best peer ms", "fastest"], rows) + [""]
    return "\n".join(lines) + "\n"
