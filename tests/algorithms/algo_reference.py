"""Slow float64 numpy references for the policy losses: plain loops, written straight from the formulas."""
import math

import numpy as np


def group_adv(r, eps=1e-4, ddof=1, scale="group"):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  all_valid = r[~np.isnan(r)]
  for b in range(r.shape[0]):
    row = r[b]
    vals = row[~np.isnan(row)]
    if len(vals) < 2 or np.all(vals == vals[0]):
      continue
    for g in range(r.shape[1]):
      if np.isnan(row[g]):
        continue
      c = row[g] - vals.mean()
      if scale == "group":
        c /= vals.std(ddof=ddof) + eps
      elif scale == "batch":
        c /= all_valid.std(ddof=ddof) + eps
      out[b, g] = c
  return out


def k_estimate(logp, ref, kind, old=None):
  d = np.clip(ref - logp, -20, 20)
  if kind == "k1":
    return logp - ref
  if kind == "k2":
    return 0.5 * (ref - logp) ** 2
  k3 = np.exp(d) - 1 - d
  if kind == "k3":
    return k3
  return np.exp(np.clip(logp - old, -20, 20)) * k3


def aggregate(per_token, mask, agg, num_tokens=None, num_seqs=None, max_len=None):
  n, _ = per_token.shape
  sums, lens = [], []
  for i in range(n):
    sums.append(sum(per_token[i, t] * mask[i, t] for t in range(per_token.shape[1]) if mask[i, t] > 0))
    lens.append(mask[i].sum())
  n_seq = num_seqs if num_seqs is not None else sum(1 for x in lens if x > 0)
  n_tok = num_tokens if num_tokens is not None else sum(lens)
  if agg == "seq_mean_token_mean":
    return sum(s / l for s, l in zip(sums, lens) if l > 0) / n_seq
  if agg == "token_mean":
    return sum(sums) / n_tok
  if agg == "seq_mean_token_sum":
    return sum(sums) / n_seq
  if agg == "dr_grpo":
    return sum(sums) / (n_seq * max_len)
  raise ValueError(agg)


def grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None, kl_coef=0.0,
              kl_estimator="k3_ratio", agg="token_mean", num_tokens=None, num_seqs=None, max_len=None,
              token_weight=None):
  eh = clip_eps if clip_eps_high is None else clip_eps_high
  n, t = logp.shape
  per = np.zeros((n, t))
  for i in range(n):
    a = adv[i]
    for j in range(t):
      rho = math.exp(min(max(logp[i, j] - old[i, j], -20), 20))
      pg = -min(rho * a, min(max(rho, 1 - clip_eps), 1 + eh) * a)
      if dual_clip is not None and a < 0:
        pg = min(pg, -dual_clip * a)
      if token_weight is not None:
        pg *= token_weight[i, j]
      kl = 0.0 if ref is None else float(k_estimate(logp[i, j], ref[i, j], kl_estimator, old[i, j]))
      per[i, j] = pg + kl_coef * kl
  return aggregate(per, mask, agg, num_tokens, num_seqs, max_len)


def p3o_loss(logp, old, ref, rewards, mask, clip_eps=0.2, kl_coef=0.05, ratio_clip=10.0, variant="joint",
             avg_tokenwise=False, frozen=None):
  """`frozen` holds the log-probs at which the detached q and rho are evaluated (default: logp itself)."""
  frozen = logp if frozen is None else frozen
  b = logp.shape[0]
  n_tok = mask.sum()
  total = 0.0
  for p in range(b):
    lam = [float(np.sum(mask[p, k] * (logp[p, k] - ref[p, k]))) for k in range(2)]
    lam_old = [float(np.sum(mask[p, k] * (old[p, k] - ref[p, k]))) for k in range(2)]
    lam_sg = [float(np.sum(mask[p, k] * (frozen[p, k] - ref[p, k]))) for k in range(2)]
    q = (rewards[p, 0] - rewards[p, 1]) - kl_coef * (lam_sg[0] - lam_sg[1])
    rho = math.exp(min(max(lam_sg[0] - lam_old[0] + lam_sg[1] - lam_old[1], -20), 20))
    rho_c = min(max(rho, 1 / ratio_clip), ratio_clip)
    if variant == "joint":
      d, d_old = lam[0] - lam[1], lam_old[0] - lam_old[1]
      la = -q * rho_c * d
      lb = -q * rho_c * min(max(d, d_old - clip_eps), d_old + clip_eps)
      total += max(la, lb)
    else:
      for k, sign in ((0, 1.0), (1, -1.0)):
        w = -q * rho_c * sign
        for t in range(logp.shape[2]):
          if mask[p, k, t] > 0:
            x, o = logp[p, k, t], old[p, k, t]
            total += max(w * x, w * min(max(x, o - clip_eps), o + clip_eps))
  if variant == "joint" and not avg_tokenwise:
    return total / b / 2
  return total / n_tok


def gdpo_adv(r, w=None, eps=1e-4, ddof=1):
  r = np.asarray(r, np.float64)
  b, g, k = r.shape
  w = np.ones(k) if w is None else np.asarray(w, np.float64)
  summed = np.zeros((b, g))
  for kk in range(k):
    summed += w[kk] * group_adv(r[:, :, kk], eps=eps, ddof=ddof)
  valid = ~np.all(np.isnan(r), axis=-1)
  vals = summed[valid]
  out = np.zeros((b, g))
  out[valid] = (vals - vals.mean()) / (vals.std(ddof=ddof) + eps)
  return out


def softplus(x):
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def finite_diff(f, x, h=1e-6):
  """Central differences of a scalar numpy function at every coordinate of x."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g
