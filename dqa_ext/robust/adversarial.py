"""The adversarial images behind a report's breaks, saved beside it and re-verified by `dqa verify`.

Per model, ``adversarial/<model>.npz`` (numpy, read with allow_pickle=False: reading it runs no
code) holds, for every image the worst case counts as broken by an attack that returns its
points, the image's test-set index, the point that broke it and the attack's name, with the
epsilon and the checkpoint's content hash. `dqa verify` loads the checkpoint and the test set
again and checks each point from scratch: inside the epsilon ball around the test image, inside
[0, 1], and misclassified. It also counts the broken images that have no saved point (attacks
that do not return their points, such as the substitute attack, or results from before saving).
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from .attacks.common import predict
from .checkpoint import load_model
from .data import load_dataset
from .errors import UserError
from .outputs import write_bytes_atomic
from .results import file_sha256, load_results

FOLDER = "adversarial"


class VerifyError(UserError):
    """Saved adversarial images that are missing, unreadable or do not hold."""


def file_name(model: str) -> str:
    return re.sub(r"[^\w.-]+", "_", model).strip("_") + ".npz"


def save(folder, model: str, points: dict, *, eps: float, checkpoint) -> Path:
    """Writes ``points`` ({test-set index: (attack, image)}) of ``model`` into folder/adversarial/."""
    index = sorted(points)
    x = np.stack([points[i][1].numpy() for i in index]).astype(np.float32) if index else np.zeros((0,), np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, index=np.asarray(index, np.int64), x=x,
                        attack=np.asarray([points[i][0] for i in index], dtype=str), eps=np.float64(eps),
                        checkpoint_sha256=np.asarray(file_sha256(checkpoint) or "", dtype=str))
    return write_bytes_atomic(Path(folder) / FOLDER / file_name(model), buf.getvalue())


def clear(folder) -> None:
    """Removes the saved images of an earlier run from ``folder`` (a report folder this command owns)."""
    sub = Path(folder) / FOLDER
    if sub.is_dir() and not sub.is_symlink():
        for f in sub.glob("*.npz"):
            if f.is_file() and not f.is_symlink():
                f.unlink()


def load(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("index", "x", "attack", "eps", "checkpoint_sha256")}
    except (OSError, ValueError, KeyError) as e:
        raise VerifyError(f"{path}: not a dqa adversarial-images file ({type(e).__name__})") from None


def verify_model(folder: Path, m: dict, *, checkpoint_dir=None, data_dir=None, device="cpu") -> dict:
    """The checks of one model's saved points; numbers for the report line."""
    path = folder / FOLDER / file_name(m["name"])
    if not path.is_file():
        raise VerifyError(f"{m['name']}: no saved adversarial images ({path} is missing)")
    saved = load(path)
    where = Path(checkpoint_dir) if checkpoint_dir is not None else folder
    ckpt = where / m["checkpoint"] if m.get("checkpoint") else None
    if ckpt is None or not ckpt.is_file():
        raise VerifyError(f"{m['name']}: its checkpoint {m.get('checkpoint')} is not in {where} "
                          "(--checkpoint-dir names the folder that holds it)")
    if str(saved["checkpoint_sha256"]) and str(saved["checkpoint_sha256"]) != file_sha256(ckpt):
        raise VerifyError(f"{m['name']}: {ckpt} is not the checkpoint the images were made on (content differs)")
    model = load_model(ckpt, device)
    ds = load_dataset(model.dqa_meta["dataset"], data_dir)
    eps = float(m["eval"]["eps"])
    if float(saved["eps"]) != eps:
        raise VerifyError(f"{m['name']}: the images were saved at epsilon {float(saved['eps']):g}, the results say {eps:g}")
    index = torch.from_numpy(saved["index"])
    x_adv = torch.from_numpy(saved["x"]).reshape(len(index), *ds.x_test.shape[1:]) if len(index) else None
    bad = []
    if x_adv is not None:
        x, y = ds.x_test[index].float(), ds.y_test[index].long()
        dist = (x_adv - x).abs().flatten(1).amax(1)
        inside = (dist <= eps * (1 + 1e-6) + 1e-7) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
        wrong = torch.from_numpy(predict(model, x_adv) != y.numpy())
        bad = [(int(i), "outside the ball" if not ok_in else "classified right")
               for i, ok_in, ok_wrong in zip(index.tolist(), inside.tolist(), wrong.tolist()) if not (ok_in and ok_wrong)]
    wc, clean = m["eval"]["worst_case"], m["eval"]["clean"]["correct"]
    broken = [i for i in range(wc["n"]) if clean[i] and not wc["robust"][i]]
    have = set(index.tolist())
    return {"model": m["name"], "saved": len(have), "broken": len(broken), "bad": bad,
            "without_point": [i for i in broken if i not in have],
            "by_attack": {a: int((saved["attack"] == a).sum()) for a in dict.fromkeys(saved["attack"].tolist())}}


def verify(path, *, checkpoint_dir=None, data_dir=None, device="cpu", log=print) -> list[dict]:
    """`dqa verify`: every saved point of every model of a report checked again; raises VerifyError
    (after printing every model's line) when any point fails."""
    results = load_results(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    out = []
    for m in results["models"]:
        r = verify_model(folder, m, checkpoint_dir=checkpoint_dir, data_dir=data_dir, device=device)
        out.append(r)
        missing = f"; {len(r['without_point'])} broken image(s) without a saved point" if r["without_point"] else ""
        log(f"{r['model']}: {r['saved'] - len(r['bad'])} of {r['saved']} saved adversarial images hold "
            f"(the worst case counts {r['broken']} broken){missing}")
    failed = [(r["model"], i, why) for r in out for i, why in r["bad"]]
    if failed:
        raise VerifyError(f"{len(failed)} saved adversarial image(s) do not hold: " +
                          ", ".join(f"{m} image {i} ({why})" for m, i, why in failed[:10]))
    return out
