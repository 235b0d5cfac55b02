"""Annealed-twin restarts, cycling four temperature schedules and six losses (targeted ones too),
on the images a report claims robust, until the time budget ends; every iterate checked on the real
model, every break verified again on a fresh copy. Usage (from this folder):

    DQA_INDEP_REPORT=dqa-report DQA_INDEP_OUT=out python annealed.py fixed3-pgd 480 7000

(model, seconds, seed base)."""
import os, sys, time, json
import torch
torch.set_num_threads(1)
from common import *

name = sys.argv[1]; budget = float(sys.argv[2]); seed_base = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
os.makedirs(OUT, exist_ok=True)
T0 = time.time(); tend = T0 + budget
x, y = data()
real = real_model(name)
claim = [m for m in json.load(open(f"{REPORT}/results.json"))["models"] if m["name"] == name][0]
cmask = torch.tensor(claim["eval"]["worst_case"]["robust"], dtype=torch.bool)
with torch.no_grad():
    clean = real(x).argmax(1) == y
assert not (cmask & ~clean).any()
chk = Checker(real, x, y)
log = open(f"{OUT}/{name}-anneal2.log", "a")
events = []
def P(*a):
    s = " ".join(str(v) for v in a); print(s, flush=True); log.write(s + "\n"); log.flush()
P(f"[{name}] clean={clean.float().mean():.3f} claimed robust={int(cmask.sum())}")
def idx_left():
    return torch.nonzero(cmask & ~chk.broken).flatten()
def save():
    torch.save(dict(name=name, broken=chk.broken, adv=chk.adv, claim=cmask, events=events), f"{OUT}/{name}-anneal2-adv.pt")
def run(att, fn):
    idx = idx_left()
    if len(idx) == 0 or time.time() > tend: return
    before = chk.broken.clone(); t0 = time.time()
    fn(idx)
    new = torch.nonzero(chk.broken & ~before).flatten().tolist()
    events.append(dict(attack=att, new=new, t=time.time() - T0))
    P(f"[{name}] {att}: +{len(new)} {new} left={len(idx_left())} ({time.time()-t0:.0f}s, total {time.time()-T0:.0f}s)")
    save()

tw = twin(real, "sig:0.1")
surs = [m for m in tw.modules() if isinstance(m, Surrogate)]
def set_T(T):
    for m in surs: m.kind = f"sig:{T}"
def anneal(idx, seed, steps, Thi, Tlo, loss, a0=0.05, tgt=None):
    lossf = make_loss(loss)
    g = torch.Generator().manual_seed(seed)
    bi = idx[~chk.broken[idx]]
    xb, yb = x[bi], y[bi]
    if tgt is not None:
        set_T(0.1)
        with torch.no_grad(): t = tw(xb).sort(1)[1][:, -(tgt + 1)]
    else: t = yb
    xa = project(xb + (2 * torch.rand(xb.shape, generator=g) - 1) * EPS, xb, EPS)
    for k in range(steps):
        set_T(round(Thi * (Tlo / Thi) ** (k / (steps - 1)), 5))
        xr = xa.clone().requires_grad_(True)
        l = lossf(tw(xr), yb, t)
        gr, = torch.autograd.grad(l.sum(), xr)
        a = a0 if k < steps // 3 else (a0 * 0.4 if k < 2 * steps // 3 else a0 * 0.16)
        xa = project(xa + a * gr.sign(), xb, EPS).detach()
        chk.check(xa, bi)

# stage 2: annealed restarts, cycling schedules and losses
scheds = [(200, 0.5, 0.02, 0.05), (150, 0.3, 0.03, 0.05), (200, 0.6, 0.01, 0.1), (250, 0.4, 0.02, 0.03)]
losses = ["ce", "dlr", "margin", "cet1", "dlrt1", "dlrt2"]
r = 0
while time.time() < tend and len(idx_left()) > 0:
    st, Thi, Tlo, a0 = scheds[r % len(scheds)]; ln = losses[r % len(losses)]
    tgt = None
    if ln[-1].isdigit(): tgt = int(ln[-1]); ln = ln[:-1]
    run(f"anneal#{r} [{st}st T{Thi}->{Tlo} a{a0} {ln}{'' if tgt is None else ' t'+str(tgt)}]",
        lambda idx: anneal(idx, seed_base + r, st, Thi, Tlo, ln, a0, tgt))
    r += 1
# final verification on fresh model
m2 = real_model(name)
b = torch.nonzero(chk.broken).flatten()
with torch.no_grad():
    a = chk.adv[b]
    ok = ((a - x[b]).abs().flatten(1).max(1)[0] <= EPS + 1e-6) & (a.flatten(1).min(1)[0] >= 0) & (a.flatten(1).max(1)[0] <= 1) & (m2(a).argmax(1) != y[b])
    ok1 = torch.tensor([bool(m2(a[i:i+1]).argmax(1).item() != y[b[i]].item()) for i in range(len(b))], dtype=torch.bool)
assert len(b) == 0 or (ok.all() and ok1.all()), "verification failed"
brk_claimed = torch.nonzero(chk.broken & cmask).flatten().tolist()
rob = cmask & ~chk.broken
res = dict(model=name, claimed_robust=int(cmask.sum()), claimed_acc=float(cmask.float().mean()),
           broken_claimed_robust=brk_claimed, n_broken=len(brk_claimed), robust_acc=float(rob.float().mean()),
           robust_mask=rob.int().tolist(), max_linf=float((chk.adv - x).abs().flatten(1).max(1)[0].max()),
           events=events, wall_s=time.time() - T0, restarts_anneal=r)
json.dump(res, open(f"{OUT}/{name}-anneal2-results.json", "w"), indent=1)
save()
P(f"[{name}] DONE robust={rob.float().mean():.3f} broke {len(brk_claimed)} of claimed {int(cmask.sum())} wall {time.time()-T0:.0f}s")
