"""Derived figures (bandwidth limits, ratios, targets) and the printed table, from run.py's raw results."""

from __future__ import annotations

from collections.abc import Iterator

from calibration.report import TOLERANCES, judge
from runtime.contract.reports import TaskFigures

CTX = ("100", "600", "1600")


def med(stat) -> float | None:
    return stat["median_ms"] if isinstance(stat, dict) and "median_ms" in stat else None


def f(x, fmt="{:.0f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def decode_rows(res: dict) -> dict[str, dict]:
    """name -> {"ms": {ctx: median}, "n": runs, "weights": bytes, "kv_read": bytes or None, "group": ...}."""
    rows = {}
    d1, d2 = res.get("decode_D1", {}), res.get("decode_D2", {})
    quantized = tuple(f"ours com {scheme}" for scheme in res.get("quantized", {}))
    for group, data, names in (("D1", d1, ("ours com", *quantized, "ours base", "torch com", "optimum base")),
                               ("D2", d2, ("ours gen",))):
        for name in names:
            if name in data.get("600", {}):
                w, kv = res["bytes"][name]
                rows[name] = {"ms": {c: med(data[c][name]) for c in CTX}, "n": data["600"][name]["n"],
                              "weights": w, "kv_read": kv, "group": group,
                              "bw": {c: res["gemv_bytes"] / (med(data[c]["GEMV"]) / 1e3) for c in CTX}}
    for prec in ("fp32", "int4"):
        g = res.get("genai", {}).get(prec)
        if isinstance(g, dict):
            rows[f"genai {prec} base"] = {"ms": {c: med(g["decode"].get(c)) for c in CTX},
                                          "n": g["decode"]["600"]["n"], "weights": g["weight_bytes"],
                                          "kv_read": None, "group": "subprocess",
                                          "bw": {c: g["gemv_bytes"] / (med(g["gemv"][c]) / 1e3) for c in CTX}}
    return rows


def finish(res: dict) -> None:
    """Add the derived figures and the target checks to `res`."""
    kv_tok = res["bytes"]["kv_per_token"]
    rows = decode_rows(res)
    for r in rows.values():  # bandwidth: the GEMV timed in the same round-robin as this decoder, at this context
        r["limit_ms"] = {c: 1e3 * (r["weights"] + kv_tok * int(c)) / r["bw"][c] for c in CTX}
        r["pct_limit"] = {c: 100 * r["limit_ms"][c] / r["ms"][c] if r["ms"][c] else None for c in CTX}
    res["derived"] = {"decode": rows}
    d2 = res.get("decode_D2", {})
    hl = {}
    for name in ("ours com", "ours gen"):
        if d2.get("600", {}).get(name):
            hl[name] = {c: med(d2[c][name]) / med(d2[c]["ours base"]) for c in CTX}
            hl[name + " bytes"] = res["bytes"][name][0] / res["bytes"]["ours base"][0]
    res["derived"]["hlora"] = hl
    v = res["vision"]
    res["derived"]["vision_gen_vs_com"] = med(v["ours com"]) / med(v["ours gen"])
    res["targets"] = targets(res, rows, hl)


def targets(res, rows, hl) -> list[dict]:
    out = []

    def add(name, measured, ok, why=""):
        out.append({"target": name, "measured": measured, "met": ok, "why": why})

    oc, tc = rows.get("ours com"), rows.get("torch com")
    if oc and tc:
        sp = {c: tc["ms"][c] / oc["ms"][c] for c in CTX}
        add("decode >= 2x faster than the PyTorch reference (COM)",
            " / ".join(f"{sp[c]:.2f}x@{c}" for c in CTX), all(s >= 2 for s in sp.values()),
            "same weight bytes read by both; see README for what separates them")
    ob, gf, g = rows.get("ours base"), rows.get("genai fp32 base"), res.get("genai", {}).get("fp32")
    if ob and gf:
        # GenAI runs back to back in its own process; our base decoder is timed the same way right before and
        # after it: that pair is the side-by-side figure (the round-robin group D1 runs under heavier cache traffic)
        near = {c: (med(g["ours_base_before"][c]) + med(g["ours_base_after"][c])) / 2 for c in CTX}
        r = {c: gf["ms"][c] / near[c] for c in CTX}
        add("plain base decode at least as fast as ORT GenAI fp32", " / ".join(f"{r[c]:.2f}x@{c}" for c in CTX),
            all(x >= 1 for x in r.values()), "GenAI ms / ours ms, ours timed back to back right before and after "
                                             "GenAI; >= 1 means ours is as fast")
    elif ob:
        add("plain base decode at least as fast as ORT GenAI fp32", str(res.get("genai", {}).get("fp32")), None)
    if oc:
        pct = oc["pct_limit"]["600"]
        add(">= 90% of the memory-bandwidth limit (COM decode @600)", f"{pct:.0f}%", pct >= 90,
            "limit = (weight + KV bytes at the context) / GEMV bandwidth measured in this run")
        flat = oc["ms"]["1600"] / oc["ms"]["100"]
        add("decode @1600 <= 1.15x decode @100 (COM)", f"{flat:.2f}x", flat <= 1.15)
    if "ours com" in hl:
        worst = max(hl["ours com"].values())
        add("COM H-LoRA decoder <= 1.25x the plain decoder", f"{worst:.2f}x (bytes {hl['ours com bytes']:.2f}x)",
            worst <= 1.25)
    quantized_targets(res, rows, add)
    accuracy_targets(res, add)
    ratio = res["derived"]["vision_gen_vs_com"]
    add("GEN vision graph >= 15x cheaper than COM's", f"{ratio:.1f}x", ratio >= 15)
    return out


def quantized_targets(res, rows, add) -> None:
    """Issue 12's: int4 decode against the PyTorch fp32 reference, the limit of its own bytes and GenAI int4;
    prefill of the quantized decoders against fp32."""
    q4, tc, g4 = rows.get("ours com int4"), rows.get("torch com"), rows.get("genai int4 base")
    if q4 and tc:
        sp = {c: tc["ms"][c] / q4["ms"][c] for c in CTX}
        add("COM int4 decode >= 4x faster than the PyTorch fp32 reference",
            " / ".join(f"{sp[c]:.2f}x@{c}" for c in CTX), all(x >= 4 for x in sp.values()))
    if q4:
        pct = q4["pct_limit"]["600"]
        add(">= 85% of the bandwidth limit from the int4 bytes (COM int4 decode @600)", f"{pct:.0f}%", pct >= 85)
    if q4 and g4:
        r = {c: g4["ms"][c] / q4["ms"][c] for c in CTX}
        add("COM int4 decode at least as fast as ORT GenAI int4 (plain base)",
            " / ".join(f"{r[c]:.2f}x@{c}" for c in CTX), all(x >= 1 for x in r.values()),
            "GenAI runs in its own process, ours in group D1 (heavier cache traffic)")
    oc = rows.get("ours com")
    if q4 and oc:
        add("int4 decoder weights <= 0.3x fp32 (COM, bytes one decode step reads)",
            f"{q4['weights'] / oc['weights']:.2f}x", q4["weights"] / oc["weights"] <= 0.3,
            "the H-LoRA (and an LM head kept float) stay fp32: their share shrinks with the layer count")
    pre = res.get("prefill_D1", {})
    fast = {k.split()[-1]: med(pre["ours com"]) / med(pre[k]) for k in ("ours com int4", "ours com w8a8") if k in pre}
    if fast:
        add("prefill 616 with int4 or w8a8 >= 1.5x faster than fp32 (COM)",
            ", ".join(f"{k} {v:.2f}x" for k, v in fast.items()), max(fast.values()) >= 1.5)


def accuracy_targets(res, add) -> None:
    """Issue 12's, from each calibrated bundle's own report (quant.json; random weights: a stress test)."""
    acc = {k: v for k, v in res.get("accuracy", {}).items() if isinstance(v, dict) and "tasks" in v}

    def worst(name, key, pick):
        return pick(t[key] for t in acc[name]["tasks"].values())

    if "int8" in acc:
        cos = worst("int8", "logit_cosine_mean", min)
        add("int8 weight-only logits cosine >= 0.995", f"{cos:.5f} (worst task)", cos >= 0.995)
    if "int4" in acc and "int4-rtn" in acc:
        kl = {t: (awq["mean_kl"], acc["int4-rtn"]["tasks"][t]["mean_kl"]) for t, awq in acc["int4"]["tasks"].items()}
        add("activation-aware int4 (AWQ) beats round-to-nearest on teacher-forced mean KL",
            ", ".join(f"{t} {a:.3g} vs {b:.3g}" for t, (a, b) in kl.items()), all(a < b for a, b in kl.values()))
    if "w8a8" in acc and "vision" in acc["w8a8"]["quantization"]["graphs"]:
        cos = worst("w8a8", "vision_cosine", min)
        add("vision w8a8 embedding cosine >= 0.99", f"{cos:.5f} (worst task)", cos >= 0.99)
    for name, a in acc.items():
        failed = misses(a)
        add(f"{name}: its accuracy within the scheme's tolerances", "FAILED: " + ", ".join(failed) if failed else
            "passed", not failed, "" if a["passed"] == (not failed) else
            f"its own report, against the tolerances it was made with: {'passed' if a['passed'] else 'FAILED'}")


def misses(acc: dict) -> list[str]:
    """The checks a bundle's measured accuracy fails against today's tolerances of its scheme (its own report keeps
    the tolerances it was calibrated with)."""
    tasks = {t: TaskFigures.from_json(v, f"tasks.{t}") for t, v in acc["tasks"].items()}
    return [f"{c.task} {c.check}" for c in judge(tasks, TOLERANCES[acc["quantization"]["scheme"]]) if not c.ok]


def accuracy_lines(res: dict) -> list[str]:
    acc = res.get("accuracy", {})
    if not acc:
        return []
    fp = acc.get("fp32", {}).get("bundle_bytes")
    out = ["ACCURACY against the fp32 bundle (each bundle's quant.json; held-out images; random weights)",
           f"  {'bundle':14s}{'task':5s}{'top-1':>8s}{'positions':>10s}{'mean KL':>10s}{'logit cos':>11s}"
           f"{'vision cos':>11s}{'gen idx':>9s}{'PSNR dB':>8s}{'size':>9s}  report"]
    for name, a in acc.items():
        if name == "fp32":
            continue
        if not isinstance(a, dict):
            out.append(f"  {name:14s}{a}")
            continue
        size = f"{a['bundle_bytes'] / fp:.2f}x" if fp else "-"
        for task, t in a["tasks"].items():
            out.append(f"  {name:14s}{task:5s}{t['top1']:8.3f}{t['positions']:10d}{t['mean_kl']:10.2e}"
                       f"{t['logit_cosine_mean']:11.5f}{t['vision_cosine']:11.5f}"
                       f"{f(t.get('gen_indices'), '{:.3f}'):>9s}{f(t.get('gen_psnr'), '{:.1f}'):>8s}{size:>9s}  "
                       f"{'FAILED' if misses(a) else 'passed'}")
    return out + ["  (size: the whole bundle, both tasks, against the fp32 bundle's; report: the figures against "
                  "today's tolerances of the scheme)", ""]


def _header_lines(res: dict) -> Iterator[str]:
    """What was measured, on which machine, how."""
    m, bw = res["meta"], res["bandwidth"]
    yield ""
    yield f"healthgpt-edge benchmark  {m['date']}  {'QUICK' if m['quick'] else 'full'} run"
    widths = ("real widths (hidden 3072, 32 heads, inter 8192, vocab 40206, H-LoRA r=64/256, CLIP ViT-L/14-336, full "
              "VQGAN)" if m.get("size", "real") == "real" else "TINY widths (a smoke run: the figures mean nothing)")
    yield (f"model: synthetic HealthGPT-M3 at {widths}, {m['layers']} decoder layers (real: 32), fp32, max_context "
      f"{m['max_context']}")
    yield (f"machine: {m['cpu']}, {m['usable_cpus']} CPUs ({m['physical_cores']} physical cores), flags: "
      f"{m.get('flags', '?')}, {m['mem_GiB']} GiB; "
      f"{m['threads_used']} threads everywhere; load avg {m['load_start']:.2f} at start, {m['load_end']:.2f} at end")
    yield f"every figure: median of {m['reps']} runs after {m['warmup']} warm-up (contenders interleaved run by run)"
    yield (f"memory bandwidth ({bw['threads']} threads, {bw['matrix_bytes'] / 2**30:.1f} GiB): GEMV a@x "
      f"{bw['gemv_GBps']:.1f} GB/s | sum {bw['sum_GBps']:.1f} GB/s | copy (r+w) {bw['copy_GBps']:.1f} GB/s")


def _vision_lines(res: dict) -> Iterator[str]:
    """The vision graphs and the VQGAN against PyTorch."""
    v = res["vision"]
    yield ""
    yield "VISION, ms            ours    PyTorch ref   ref/ours"
    for t in ("com", "gen"):
        o, r = med(v[f"ours {t}"]), med(v.get(f"torch {t}")) or med(v["torch com"])
        yield (f"  {t:18s}{o:8.0f}  {r:12.0f}  {r / o:8.1f}x" + ("" if f"torch {t}" in v else "  (= torch com: the "
                                                             "reference runs the whole CLIP for both; --quick)"))
    yield f"  gen vs com (ours): gen is {res['derived']['vision_gen_vs_com']:.1f}x cheaper"
    q = res["vqgan"]
    yield (f"VQGAN decoder, ms: ours {med(q['ours']):.0f}, PyTorch {med(q['torch']):.0f} "
      f"({med(q['torch']) / med(q['ours']):.1f}x)")


def _decode_lines(res: dict) -> Iterator[str]:
    """Decode per context against the bandwidth limit, the peers' base decoders, the quantized rows."""
    rows = res["derived"]["decode"]
    yield ""
    yield ("DECODE, ms/token           ctx~100   ~600  ~1600  1600/100  weights GB  GEMV GB/s@600  limit@600  %limit "
      "(100/600/1600)")
    for name, r in rows.items():
        ms, pl = r["ms"], r["pct_limit"]
        yield (f"  {name:23s}{f(ms['100'], '{:8.0f}')}{f(ms['600'], '{:7.0f}')}{f(ms['1600'], '{:7.0f}')}"
          f"{ms['1600'] / ms['100']:10.2f}{r['weights'] / 1e9:12.2f}{r['bw']['600'] / 1e9:15.1f}"
          f"{r['limit_ms']['600']:11.0f}  " + " / ".join(f(pl[c], "{:.0f}%") for c in CTX))
    yield (f"  (limit = (weight bytes + {res['bytes']['kv_per_token'] / 1024:.0f} KiB of KV per cached token) / the "
      f"bandwidth of a {res['gemv_bytes'] / 2**30:.0f} GiB GEMV timed in the same round-robin; ours reads its whole "
      f"cache buffer, a power of two of rows >= the context: "
      + " / ".join(f"{res['bytes']['ours com'][1][c] / 1e6:.0f}" for c in CTX) + " MB/token of KV)")
    for prec in ("fp32", "int4"):
        g = res.get("genai", {}).get(prec)
        if not isinstance(g, dict):
            yield f"  genai {prec} base: {g}"
        else:
            yield (f"  our base decoder measured around genai {prec}: before "
              + " / ".join(f(med(g['ours_base_before'][c])) for c in CTX) + ", after "
              + " / ".join(f(med(g['ours_base_after'][c])) for c in CTX) + " ms")
    for scheme, q in res.get("quantized", {}).items():
        yield (f"  ours com {scheme}: " + (f"session RSS +{q['rss_delta'] / 2**30:.2f} GiB, weight bytes from the "
                                      f"quantized tensors ({q['bundle']}/quant.md: its accuracy)"
                                      if isinstance(q, dict) else q))
    if isinstance(res.get("peers", {}).get("optimum"), str) and "not" in res["peers"]["optimum"]:
        yield f"  optimum base: {res['peers']['optimum']}"


def _summary_lines(res: dict) -> Iterator[str]:
    """Prefill, H-LoRA overhead, time to first token, one generated image."""
    rows = res["derived"]["decode"]
    pre = dict(res["prefill_D1"])
    if "prefill_base_anchor" in res:
        pre["ours base"] = res["prefill_base_anchor"]["ours base"]
    for prec in ("fp32", "int4"):
        g = res.get("genai", {}).get(prec)
        if isinstance(g, dict):
            pre[f"genai {prec} base"] = g["prefill"]
    yield ("PREFILL 616 tokens (576 image + 40 text), ms: "
      + " | ".join(f"{k} {med(s):.0f}" for k, s in pre.items()))
    hl = res["derived"]["hlora"]
    if hl:
        yield ("H-LORA overhead vs the plain base decoder (same run, group D2): "
          + "; ".join(f"{k.split()[1]} {' / '.join(f'{hl[k][c]:.2f}x' for c in CTX)} (bytes {hl[k + ' bytes']:.2f}x)"
                      for k in ("ours com", "ours gen") if k in hl))
    t = res["ttft"]
    yield (f"TIME TO FIRST TOKEN (ask, {res.get('prompt_tokens')} prompt tokens incl. image), ms: ours "
      f"{med(t['ours ask']):.0f}, "
      + "".join(f"ours {k.split()[-1]} {med(v):.0f}, " for k, v in t.items() if k.startswith("ours ask "))
      + f"PyTorch reference {f(med(t.get('torch answer')), none='skipped (--quick)')}")
    g = res.get("generate")
    if isinstance(g, dict):
        for name, one in g.items():
            yield (f"GENERATE one image, {name} (1024 constrained tokens, measured once): {one['seconds']:.0f} s; step "
              f"median {one['step_median_ms']:.0f} ms (first 100: {one['step_median_ms_first100']:.0f}, last 100: "
              f"{one['step_median_ms_last100']:.0f})")
    else:
        oc = rows.get("ours com") or {}
        est = (med(t["ours ask"]) + 1024 * (oc.get("ms", {}).get("600") or 0)) / 1e3
        yield f"GENERATE one image: {g}; projected from TTFT + 1024 x decode@600 (COM decoder as a proxy): {est:.0f} s"
    yield ""


def table(res: dict) -> str:
    L = [*_header_lines(res), *_vision_lines(res), *_decode_lines(res), *_summary_lines(res), *accuracy_lines(res)]
    w = L.append
    w("OPTIMIZATIONS (before = shipped, after = alternative; same run, interleaved)")
    for line in opt_lines(res["opt"]):
        w("  " + line)
    w("")
    w("TARGETS")
    for tg in res["targets"]:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[tg["met"]]
        w(f"  [{mark}] {tg['target']}: {tg['measured']}" + (f"  ({tg['why']})" if tg["why"] else ""))


    return "\n".join(L)


def opt_lines(o: dict) -> list[str]:
    out = []
    kv = o["kv"]
    out.append("KV cache in place (shipped) vs concat copy of past+new per step (emulated: np.concatenate of every "
               "layer's K/V), ms/token: " + "; ".join(
                   f"@{c} {med(kv[c]['in place (shipped)']):.0f} vs {med(kv[c]['concat copy (emulated)']):.0f}"
                   for c in CTX))
    rows = o.get("cache_rows")
    if isinstance(rows, dict):
        out.append("KV cache grown by powers of two (shipped) vs held at max_context rows (the first design), ms: "
                   + "; ".join(f"{'decode@' + c if c != 'prefill' else 'prefill'} "
                               f"{med(rows[c]['grown (shipped)']):.0f} vs {med(rows[c]['max_context rows']):.0f}"
                               for c in (*CTX, "prefill")))
    for name, label in (("com-gemm1", "H-LoRA one GEMM [W;A;R] vs W + [A;R] (shipped)"),
                        ("com-allpos", "logits for all positions vs last position (shipped)"),
                        ("com-dynamo", "dynamo export vs TorchScript (shipped)")):
        r = o.get(name)
        if not isinstance(r, dict):
            out.append(f"{label}: {r}")
            continue
        parts = [f"{m.replace('decode', 'decode@')} {med(r[m]['shipped']):.0f} -> {med(r[m][name]):.0f} ms"
                 for m in ("decode600", "prefill") if m in r]
        out.append(f"{label}: " + ", ".join(parts) + f", RSS +{r['rss_delta'] / 2**30:.2f} GiB")
    s = o.get("session")
    if isinstance(s, dict):
        for label, r in s.items():
            if isinstance(r, str):
                out.append(f"ORT session {label:26s}: {r}")
                continue
            b = r["bench"]
            out.append(f"ORT session {label:26s}: decode@600 {med(b['shipped']):.0f} (shipped) -> "
                       f"{med(b[label]):.0f} ms, session RSS +{r['rss_delta'] / 2**30:.2f} GiB")
    else:
        out.append(f"ORT session settings: {s}")
    return out
