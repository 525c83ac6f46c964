"""Orthogonal rotations of a linear's input space (QuaRot-style), and how they fold into weights.

A rotation Q (n x n, Q Q^T = I) turns an activation x into x Q. A linear reading it keeps its
output when its weight (o, n) becomes W Q; one writing it (W: (n, i), bias (n,)) produces the
rotated output when W becomes Q^T W and the bias b Q. Spreading a few outlier channels over all
n channels is what a shared per-row scale (DGQ's s1) and int8 per-token activations need.

Hadamard matrices (entries +-1, H H^T = n I) spread best: every output channel is the same-weight
mix of every input. Orders that are not a power of two come from the Kronecker product of a
Paley matrix (order q + 1 for a prime q = 3 mod 4, 2 (q + 1) for a prime q = 1 mod 4) with a
Sylvester power of two, which covers the usual widths (576 = 36 * 16, 896 = 28 * 32,
960 = 60 * 16, 1536 = 12 * 128); where no such order exists the matrix is block-diagonal in the
largest constructible order dividing n. Random signs (H diag(s), QuaRot's randomized Hadamard)
make the rotation depend on a seed.

Pure tensor functions: matrices are built and applied in float64, so a fold is exact to fp32. A
fold runs on the rotation matrix's device (float64 GEMMs of a 7B model take minutes on a CPU and
about a second on a GPU) and leaves the weight where it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("none", "hadamard", "random")


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(i - j) with chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(1) - idx.unsqueeze(0)) % q]


def _paley_construction(order: int) -> int:
    """1 or 2: which of Paley's constructions gives a Hadamard matrix of `order` (prime q only); 0: neither."""
    if (order - 1) % 4 == 3 and _is_prime(order - 1):
        return 1
    return 2 if order % 2 == 0 and (order // 2 - 1) % 4 == 1 and _is_prime(order // 2 - 1) else 0


def paley_order_exists(order: int) -> bool:
    """Paley's constructions give a Hadamard matrix of this order (the factors an online rotation may have)."""
    return _paley_construction(order) != 0


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of `order` from Paley's constructions I and II (prime q only), else None."""
    construction = _paley_construction(order)
    if construction == 1:  # Paley I: I + S with S the bordered skew Jacobsthal matrix
        q = order - 1
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    if construction == 2:  # Paley II: C's zeros -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]]
        q = order // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1.0, 1.0
        c[1:, 1:] = _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        other = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, other) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


@lru_cache(maxsize=None)
def _hadamard_or_none(n: int) -> torch.Tensor | None:
    for power in (1 << k for k in range(n.bit_length() - 1, -1, -1)):
        if n % power:
            continue
        base = torch.ones(1, 1, dtype=torch.float64) if n == power else _paley(n // power)
        if base is not None:
            return torch.kron(base, _sylvester(power))
    return None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (+-1 entries, H H^T = n I), float64; ValueError if none is built."""
    h = _hadamard_or_none(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed (2^k times a Paley order)")
    return h.clone()


def block_order(n: int) -> int:
    """The largest order dividing n that has a Hadamard matrix here (n itself when possible)."""
    return next(b for b in range(n, 0, -1) if n % b == 0 and _hadamard_or_none(b) is not None)


def _random_signs(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1


def _signed_blocks(signs: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """diag(signs) blockdiag(block, block, ...): (n, n) float64."""
    return signs.double().cpu().unsqueeze(1) * torch.block_diag(*[block] * (signs.shape[0] // block.shape[0]))


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal diag(s) H / sqrt(b) with random signs s; H block-diagonal in block_order(n)."""
    b = block_order(n)
    return _signed_blocks(_random_signs(n, seed), _hadamard_or_none(b) / b**0.5)


@dataclass(frozen=True)
class FactoredHadamard:
    """Q = diag(signs) blockdiag(P kron S, ...) / sqrt(p t) kept as its factors, the form an online
    rotation (one applied to activations at run time) takes: x Q costs n (p + log2 t) operations
    per token instead of n^2. P is a Paley matrix of order p (1 x 1 when the block is a power of
    two), S the Sylvester matrix of order t, applied as a fast Walsh-Hadamard transform."""

    signs: torch.Tensor  # (n,) +-1
    paley: torch.Tensor  # (p, p)
    sylvester_order: int  # t

    @property
    def block(self) -> int:
        return self.paley.shape[0] * self.sylvester_order

    def to(self, device) -> FactoredHadamard:
        """The factors on `device` (float64): apply() then moves nothing, so it can be graph-captured."""
        return FactoredHadamard(self.signs.to(device), self.paley.to(device), self.sylvester_order)

    def block_matrix(self) -> torch.Tensor:
        """One (b, b) float64 block of the Hadamard part, P kron S / sqrt(b)."""
        return torch.kron(self.paley.double().cpu(), _sylvester(self.sylvester_order)) / self.block**0.5

    def matrix(self) -> torch.Tensor:
        """The dense (n, n) float64 Q, to fold Q^T into the weight that reads the rotated input."""
        return _signed_blocks(self.signs, self.block_matrix())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> x Q in x's dtype, computed in float32 at least (16-bit butterflies would
        round at each of the log2 t stages): each block of p t features as a (p, t) matrix V -> P^T V S."""
        p, t = self.paley.shape[0], self.sylvester_order
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        signs = self.signs.to(x.device, wide) * self.block**-0.5
        v = (x.to(wide) * signs).reshape(*x.shape[:-1], x.shape[-1] // (p * t), p, t)  # explicit: rows may be 0
        if p > 1:
            v = self.paley.T.to(x.device, wide) @ v
        lead, h = v.shape[:-1], 1
        while h < t:  # V S_t with S_2h = [[S_h, S_h], [S_h, -S_h]]: butterflies of stride 1, 2, 4, ...
            pairs = v.reshape(*lead, t // (2 * h), 2, h)
            v = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
            v, h = v.reshape(*lead, t), 2 * h
        return v.reshape(x.shape).to(x.dtype)


def factor_problems(signs: torch.Tensor, paley: torch.Tensor) -> list[str]:
    """What keeps stored factors from being an online rotation's: signs +-1, P a Hadamard matrix."""
    p = paley.shape[0]
    if not bool((signs.abs() == 1).all()):
        return ["online_signs holds values other than +-1"]
    if not bool((paley.abs() == 1).all()) or not torch.equal(paley.double() @ paley.double().T, p * torch.eye(p, dtype=torch.float64)):
        return [f"online_paley is no Hadamard matrix of order {p}"]
    return []


def factored_hadamard(n: int, seed: int, max_paley: int = 64) -> FactoredHadamard:
    """The online rotation of n features: the largest block p t dividing n with p a Paley order up
    to max_paley (or 1) and t a power of two, the largest t among equals -- random_hadamard(n, seed)
    itself wherever block_order(n) factors so (1536 = 12 x 128, 576 = 36 x 16, 4096 = 1 x 4096).
    Llama-2-7B's 11008 has a whole order here (Paley 5504 x 2), but a dense factor of 5504 per token
    is no online rotation: it gets blocks of 256."""
    candidates = [(p, 1 << k) for k in range(n.bit_length()) for p in range(1, max_paley + 1)
                  if n % (p << k) == 0 and (p == 1 or _paley_construction(p))]
    p, t = max(candidates, key=lambda pt: (pt[0] * pt[1], pt[1]))
    paley = torch.ones(1, 1, dtype=torch.float64) if p == 1 else _paley(p)
    return FactoredHadamard(_random_signs(n, seed), paley, t)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """The (n, n) float64 orthogonal matrix of a rotation kind ('hadamard' or 'random')."""
    if kind == "hadamard":
        return random_hadamard(n, seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind '{kind}'; known: {', '.join(KINDS)}")


@torch.no_grad()
def scale_inputs(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """W (o, n) <- W diag(scale): absorb a norm's elementwise weight into the linear it feeds."""
    weight.copy_((weight.double() * scale.double().unsqueeze(0)).to(weight.dtype))


def _on(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return t.to(q.device, torch.float64)


@torch.no_grad()
def rotate_inputs(weight: torch.Tensor, q: torch.Tensor) -> None:
    """W (o, n) <- W Q: the linear reads x Q and still computes x W^T (also rotates embedding rows)."""
    weight.copy_(_on(weight, q) @ q.double())


@torch.no_grad()
def rotate_outputs(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor) -> None:
    """W (n, i) <- Q^T W and b <- b Q: the linear writes its output already rotated."""
    weight.copy_(q.double().T @ _on(weight, q))
    if bias is not None:
        bias.copy_(_on(bias, q) @ q.double())


@torch.no_grad()
def rotate_head_outputs(weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor) -> None:
    """rotate_outputs with the (d, d) matrix r applied to each d-row head block of W (heads * d, i)."""
    d = r.shape[0]
    heads = weight.shape[0] // d
    w = _on(weight, r).reshape(heads, d, -1)
    weight.copy_((r.double().T @ w).reshape(weight.shape))
    if bias is not None:
        bias.copy_((_on(bias, r).reshape(heads, d) @ r.double()).reshape(-1))


@torch.no_grad()
def rotate_head_inputs(weight: torch.Tensor, r: torch.Tensor) -> None:
    """rotate_inputs with r applied to each d-column head block of W (o, heads * d)."""
    d = r.shape[0]
    w = _on(weight, r).reshape(weight.shape[0], -1, d)
    weight.copy_((w @ r.double()).reshape(weight.shape))
