"""Usage: python attack.py MODEL_NAME BUDGET_SECONDS [N_THREADS] [--smoke] [--order-v1]
Attacks the images results.json claims robust for MODEL_NAME; logs to $DQA_AUDIT_OUT/MODEL.log.json,
saves verified breaks to $DQA_AUDIT_OUT/MODEL.npz."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (EPS, OUT, Tracker, claimed_robust, data200, fresh, is_quantized, margin, pgd, project,
                    square, surrogate, verify_and_save)

name = sys.argv[1]
budget = float(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
smoke = "--smoke" in sys.argv
order_v1 = "--order-v1" in sys.argv  # the first phase order (fixed2-pgd's audit ran with it)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1234)

x, y = data200()
if smoke:
    idx_claimed = list(range(8))
else:
    idx_claimed, entry = claimed_robust(name)
xc, yc = x[idx_claimed], y[idx_claimed]
exact = fresh(name)
for p in exact.parameters():
    p.requires_grad_(False)
quant = is_quantized(exact)

# sanity: the hard surrogate must replicate the exact model
if quant:
    hard = surrogate(exact, "hard")
    with torch.no_grad():
        a, b = exact(xc), hard(xc)
        xr = project(xc + (torch.rand(xc.shape, generator=gen) * 2 - 1) * EPS, xc)
        a2, b2 = exact(xr), hard(xr)
    rep = {"clean_maxdiff": float((a - b).abs().max()), "rand_maxdiff": float((a2 - b2).abs().max()),
           "rand_argmax_agree": float((a2.argmax(1) == b2.argmax(1)).float().mean())}
    print("replica check", rep, flush=True)

with torch.no_grad():
    clean_pred = exact(xc).argmax(1)
print(f"{name}: {len(idx_claimed)} claimed robust; clean-correct among them: "
      f"{int((clean_pred == yc).sum())}", flush=True)

tr = Tracker(exact, xc, yc)
tr.check(xc, torch.arange(len(xc)), "clean")
t_start = time.time()
log = []


def remaining():
    return budget - (time.time() - t_start)


def alive():
    return torch.nonzero(~tr.broken).flatten()


def phase(tag, fn):
    if remaining() <= 0:
        return
    ids = alive()
    if len(ids) == 0:
        return
    t0 = time.time()
    q0 = tr.queries
    before = int(tr.broken.sum())
    fn(ids, tag)
    dt = time.time() - t0
    new = int(tr.broken.sum()) - before
    rec = {"phase": tag, "seconds": round(dt, 1), "targets": len(ids), "new_breaks": new,
           "total_breaks": int(tr.broken.sum()), "exact_queries": tr.queries - q0,
           "min_exact_margin_left": float(tr.best_m[~tr.broken].min()) if bool((~tr.broken).any()) else None}
    log.append(rec)
    print(json.dumps(rec), flush=True)


R = 4 if smoke else 10
S = 30 if smoke else 100


def targets_for(ids, model, k):
    """Top-k non-true classes by `model`'s clean logits, repeated per restart block."""
    with torch.no_grad():
        lg = model(xc[ids])
    lg = lg.clone()
    lg.scatter_(1, yc[ids][:, None], -float("inf"))
    return lg.topk(k, 1).indices  # [n, k]


if not quant:
    m = exact
    phase("pgd-cw-uniform", lambda ids, t: pgd(tr, m, ids, R, S, "cw", tag=t, gen=gen))
    phase("pgd-ce-uniform", lambda ids, t: pgd(tr, m, ids, R, S, "ce", tag=t, gen=gen))
    phase("pgd-dlr-corner", lambda ids, t: pgd(tr, m, ids, R, S, "dlr", init="corner", tag=t, gen=gen))

    def targeted(ids, t):
        tg = targets_for(ids, m, 9)
        for k in range(9):
            ids2 = ids[~tr.broken[ids]]
            if len(ids2) == 0:
                return
            tk = tg[torch.isin(ids, ids2)][:, k]
            pgd(tr, m, ids2, 2, S, "tcw", targets=tk.repeat(2), tag=f"{t}-{k}", gen=gen)
    phase("pgd-targeted-cw-9", targeted)
    phase("square-exact", lambda ids, t: square(tr, ids, 300 if smoke else 3000, tag=t, gen=gen, restarts=2))
    rnd = 0
    while remaining() > 5 and len(alive()) and not smoke:
        rnd += 1
        phase(f"more-cw-r{rnd}", lambda ids, t: pgd(tr, m, ids, 20, 200, "cw", init="uniform", tag=t, gen=gen,
                                                      alpha0=EPS / 4))
        phase(f"more-ce-best-r{rnd}", lambda ids, t: pgd(tr, m, ids, 10, 200, "ce", init="best", tag=t, gen=gen))
else:
    ste = surrogate(exact, "ste")
    clamp = surrogate(exact, "clamp")
    soft = surrogate(exact, "soft", T=0.3)
    softste = surrogate(exact, "softste", T=0.5)
    relu_ref = fresh("relu-pgd") if not smoke else None

    R, S = (2, 30) if smoke else (4, 100)
    ce = 2  # check the exact model every 2nd iterate (and the last)
    phase("soft-anneal-cw", lambda ids, t: pgd(tr, soft, ids, R, 2 * S, "cw", anneal=(1.0, 0.02), tag=t, gen=gen,
                                               check_every=ce))
    bpda_ste = lambda ids, t: pgd(tr, ste, ids, R, S, "cw", tag=t, gen=gen, check_every=ce)  # noqa: E731
    clamp_cw = lambda ids, t: pgd(tr, clamp, ids, R, S, "cw", tag=t, gen=gen, check_every=ce)  # noqa: E731
    square_tie = lambda n: lambda ids, t: square(tr, ids, 300 if smoke else n, tag=t,  # noqa: E731
                                                 tie_model=clamp, gen=gen, restarts=1)
    soft_best = lambda ids, t: pgd(tr, soft, ids, R, S, "cw", init="best", anneal=(0.3, 0.01),  # noqa: E731
                                   alpha0=EPS / 8, tag=t, gen=gen, check_every=ce)
    if order_v1:  # the order fixed2-pgd ran with: BPDA and the clamp first, Square and the restarts last
        phase("bpda-ste-cw", bpda_ste)
        phase("clamp-surrogate-cw", clamp_cw)
    else:
        phase("clamp-surrogate-cw", clamp_cw)
        phase("square-exact-tie-clamp", square_tie(1000))
        phase("soft-from-best", soft_best)
        phase("bpda-ste-cw", bpda_ste)
    phase("soft-anneal-dlr-corner", lambda ids, t: pgd(tr, soft, ids, R // 2, 2 * S, "dlr", anneal=(0.5, 0.05),
                                                       init="corner", tag=t, gen=gen, check_every=ce))
    phase("bpda-softste-ce", lambda ids, t: pgd(tr, softste, ids, R // 2, S, "ce", tag=t, gen=gen, check_every=ce))
    if relu_ref is not None:
        phase("transfer-from-relu-pgd", lambda ids, t: pgd(tr, relu_ref, ids, R, S, "cw", tag=t, gen=gen))
    def targeted(ids, t):
        tg = targets_for(ids, clamp, 2)
        for k in range(2):
            ids2 = ids[~tr.broken[ids]]
            if len(ids2) == 0:
                return
            tk = tg[torch.isin(ids, ids2)][:, k]
            pgd(tr, soft, ids2, 2, int(1.5 * S), "tcw", targets=tk.repeat(2), anneal=(1.0, 0.03), tag=f"{t}-{k}",
                gen=gen, check_every=ce)
    phase("targeted-top2-soft", targeted)
    if order_v1:
        phase("square-exact-tie-clamp", square_tie(1500))
        phase("soft-from-best", soft_best)
    rnd = 0
    while remaining() > 5 and len(alive()) and not smoke:
        rnd += 1
        Tf = [0.1, 0.3, 1.0][rnd % 3]
        phase(f"more-soft-T{Tf}-r{rnd}", lambda ids, t: pgd(tr, soft, ids, 4, 150, "cw", init="corner",
                                                            anneal=(Tf * 3, Tf / 3), tag=t, gen=gen, check_every=2))
        phase(f"more-square-r{rnd}", lambda ids, t: square(tr, ids, 500, init="best", tag=t, tie_model=soft,
                                                           gen=gen, restarts=1))

total = time.time() - t_start
out = f"{OUT}/{name}{'-smoke' if smoke else ''}.npz"
verified = verify_and_save(name, x, y, idx_claimed, tr.adv, tr.broken, out)
summary = {"model": name, "claimed_robust": len(idx_claimed), "claimed_indices": idx_claimed,
           "broken_verified": verified, "n_broken": len(verified), "attack_seconds": round(total, 1),
           "exact_queries": tr.queries,
           "by_phase": {str(idx_claimed[j]): tr.by[j] for j in range(len(idx_claimed)) if tr.broken[j]},
           "phases": log}
json.dump(summary, open(f"{OUT}/{name}{'-smoke' if smoke else ''}.log.json", "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("model", "claimed_robust", "n_broken", "broken_verified",
                                          "attack_seconds")}), flush=True)
