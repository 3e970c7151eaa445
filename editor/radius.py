"""Pure functions on keys and radii: distances, BalancEdit's radius choice, GRACE's overlap rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editor.config import Distance


def pairwise_distances(queries: torch.Tensor, keys: torch.Tensor, distance: Distance) -> torch.Tensor:
    """Distances between every query and every key. queries (B, D), keys (N, D) -> (B, N)."""
    queries = queries.float()
    keys = keys.float()
    if distance == "cosine":
        q = torch.nn.functional.normalize(queries, dim=-1)  # (B, D)
        k = torch.nn.functional.normalize(keys, dim=-1)  # (N, D)
        return (1.0 - q @ k.T).clamp_min(0.0)  # (B, N)
    return torch.cdist(queries.unsqueeze(0), keys.unsqueeze(0)).squeeze(0)  # (B, N)


@dataclass(frozen=True)
class RadiusChoice:
    radius: float
    # None when every positive lies inside and every negative outside; else why not, and what
    # the fallback did.
    fallback: str | None


def choose_radius(
    positive_distances: torch.Tensor,
    negative_distances: torch.Tensor,
    alpha: float,
    initial_radius: float,
) -> RadiusChoice:
    """BalancEdit's radius from the distances of the positives and negatives to the fact's key.

    With one positive and one negative this is the paper's ``(1 - alpha) * d_neg + alpha * d_pos``.
    With several, ``d_pos`` is the farthest positive and ``d_neg`` the nearest negative, so every
    positive falls inside and every negative outside. When that is impossible (a negative lies
    no farther than some positive), the fallback puts the boundary at the positive distance (or 0)
    with the best balanced accuracy (share of positives inside plus share of negatives outside;
    the fact's own key counts as a positive at distance 0), preferring the smaller radius on ties,
    and then places the radius between that boundary and the next negative out with `alpha`.
    """
    pos = positive_distances.float().flatten()
    neg = negative_distances.float().flatten()
    if pos.numel() == 0 and neg.numel() == 0:
        return RadiusChoice(initial_radius, "no positives or negatives; used initial_radius")
    if neg.numel() == 0:
        far = float(pos.max())
        return RadiusChoice(far * (1.0 + alpha) if far > 0 else initial_radius,
                            "no negatives; radius covers the farthest positive with margin alpha")
    near_negative = float(neg.min())
    far_positive = float(pos.max()) if pos.numel() else 0.0
    if far_positive < near_negative:
        return RadiusChoice((1.0 - alpha) * near_negative + alpha * far_positive, None)

    # Infeasible: scan candidate radii at 0 and at each positive's distance.
    candidates = torch.cat([torch.zeros(1), pos]).unique()  # sorted ascending
    inside = ((pos.unsqueeze(0) <= candidates.unsqueeze(1)).sum(1) + 1) / (pos.numel() + 1)  # (C,)
    outside = (neg.unsqueeze(0) > candidates.unsqueeze(1)).sum(1) / neg.numel()  # (C,)
    score = inside + outside  # balanced accuracy: positives and negatives weigh the same in total
    best = int(torch.nonzero(score == score.max())[0])  # first = smallest radius among the best
    boundary = float(candidates[best])
    # Place the radius between that boundary and the next negative out, as the paper's formula does.
    beyond = neg[neg > boundary]
    if beyond.numel():
        radius = (1.0 - alpha) * float(beyond.min()) + alpha * boundary
    else:
        radius = boundary * (1.0 + alpha) if boundary > 0 else initial_radius
    n_neg_inside = int((neg <= radius).sum())
    n_pos_outside = int((pos > radius).sum())
    return RadiusChoice(
        radius,
        f"{int((neg <= far_positive).sum())} of {neg.numel()} negatives lie no farther than the "
        f"farthest positive ({far_positive:.4g} >= {near_negative:.4g}); radius {radius:.4g} leaves "
        f"{n_pos_outside} of {pos.numel()} positives outside and {n_neg_inside} negatives inside",
    )


@dataclass(frozen=True)
class SplitResult:
    radii: torch.Tensor  # (N,)
    cut_by: tuple[tuple[int, ...], ...]  # for each entry, the entries whose arrival cut its radius


def resolve_overlaps(
    keys: torch.Tensor, base_radii: torch.Tensor, answers: list[str], distance: Distance,
    reaches: torch.Tensor | None = None,
) -> SplitResult:
    """The overlap rule (`arrive`), replayed over the entries in insertion order.

    Each entry keeps the radius it was given when added (`base_radii`). When an entry arrives,
    every earlier entry with a different answer whose ball overlaps its own (distance below the
    sum of the two current radii) is cut so that the two balls no longer overlap, and so is the
    new entry: with every reach 0 (`reaches`, default), each to half their distance (GRACE).
    Entries with the same answer may overlap: together they cover both keys. Because the effective
    radii are a function of the entries alone, removing an entry and replaying gives exactly the
    radii the codebook would have had without it.

    Radii only shrink, so only pairs whose base balls overlap can ever interact: those are found
    first with blocked matrix products (with a safety margin), and the replay then visits only
    them, with the same exact per-pair distances as `arrive` on its own.
    """
    n = keys.shape[0]
    radii = base_radii.float().clone()
    cut_by: list[list[int]] = [[] for _ in range(n)]
    codes = _answer_codes(answers)
    candidates = _overlap_candidates(keys, radii, codes, distance)
    for i in range(1, n):
        if candidates[i].numel():
            arrive(keys, radii, codes, i, distance, cut_by, candidates[i], reaches)
    return SplitResult(radii, tuple(tuple(c) for c in cut_by))


CANDIDATE_BLOCK_CELLS = 1 << 22  # distances per block of the candidate search (16 MB of float32)


def _overlap_candidates(
    keys: torch.Tensor, base_radii: torch.Tensor, codes: torch.Tensor, distance: Distance
) -> list[torch.Tensor]:
    """For each entry i, the earlier entries j < i with another answer whose base balls may overlap.

    A superset of the pairs with exact distance below base_radii[i] + base_radii[j]: the blocked
    products carry rounding that the margin covers.
    """
    n = keys.shape[0]
    keys = keys.float()
    if distance == "cosine":
        unit = torch.nn.functional.normalize(keys, dim=-1)  # (N, D)
    else:
        norms = (keys * keys).sum(dim=1)  # (N,)
    block = max(1, CANDIDATE_BLOCK_CELLS // max(n, 1))
    result: list[torch.Tensor] = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = torch.arange(start, stop)
        reach = base_radii[rows].unsqueeze(1) + base_radii.unsqueeze(0)  # (R, N)
        if distance == "cosine":
            near = (1.0 - unit[rows] @ unit.T) <= reach + 1e-5  # (R, N)
        else:
            squared = norms[rows].unsqueeze(1) - 2.0 * keys[rows] @ keys.T + norms.unsqueeze(0)  # (R, N)
            slack = 1e-5 * (norms[rows].unsqueeze(1) + norms.unsqueeze(0)) + 1e-6  # (R, N)
            near = squared <= reach * reach + slack
        near &= codes[rows].unsqueeze(1) != codes.unsqueeze(0)
        near &= torch.arange(n).unsqueeze(0) < rows.unsqueeze(1)  # earlier entries only
        result.extend(torch.nonzero(row).flatten() for row in near)
    return result


def _answer_codes(answers: list[str]) -> torch.Tensor:
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(a, len(index)) for a in answers], dtype=torch.long)


def pair_distances(keys: torch.Tensor, i: int, others: torch.Tensor | slice, distance: Distance) -> torch.Tensor:
    """Exact distances from keys[i] to keys[others], one row at a time (no batch-dependent
    rounding: the same pair always gets the same value). -> (len(others),)

    `others` is indices or a slice (a view of the keys rather than a gathered copy)."""
    key = keys[i].float()
    chosen = keys[others].float()  # (M, D)
    if distance == "cosine":
        unit = torch.nn.functional.normalize(key, dim=-1)
        return (1.0 - (torch.nn.functional.normalize(chosen, dim=-1) * unit).sum(dim=-1)).clamp_min(0.0)
    return (chosen - key).norm(dim=-1)


def arrive(
    keys: torch.Tensor,
    radii: torch.Tensor,
    codes: torch.Tensor,
    i: int,
    distance: Distance,
    cut_by: list[list[int]] | None = None,
    candidates: torch.Tensor | None = None,
    reaches: torch.Tensor | None = None,
) -> list[int]:
    """Apply the overlap rule for entry `i` against entries 0..i-1 (or only `candidates`, sorted
    ascending, when every other earlier entry is known not to overlap), updating `radii` in place.

    A pair with different answers whose balls overlap (distance d below the sum of their radii)
    shares d between them. Each first keeps its reach (`reaches`: how far its own positives lie,
    at most its radius), and the room left, d minus both reaches, is split evenly; so an entry
    is cut below its own positives only when the two reaches together exceed d, and then the two
    get d in proportion to their reaches. With both reaches 0 each gets d / 2: GRACE's halving.
    A radius is only ever lowered, and afterwards the two balls no longer overlap.

    Returns the earlier entries whose radius `i` cut or that cut `i`'s, ascending; `cut_by`, when
    given, also records them (i appended to each cut entry's list, the others to i's)."""
    others = torch.arange(i) if candidates is None else candidates  # (M,)
    d = pair_distances(keys, i, slice(0, i) if candidates is None else candidates, distance)  # (M,)
    overlapping = (codes[others] != codes[i]) & (d < radii[others] + radii[i])  # (M,)
    if not bool(overlapping.any()):
        return []
    theirs, mine = _shares(d, radii, others, i, reaches)  # (M,), (M,)
    cut_earlier = overlapping & (radii[others] > theirs)  # (M,)
    new_radius = float(torch.where(overlapping, mine, radii[i].expand_as(mine)).min())
    cut = others[cut_earlier].tolist()
    cutting = others[overlapping & (mine < radii[i])].tolist() if new_radius < float(radii[i]) else []
    if cut_by is not None:
        for j in cut:
            cut_by[j].append(i)
        cut_by[i].extend(cutting)
    radii[others] = torch.where(cut_earlier, theirs, radii[others])
    radii[i] = min(float(radii[i]), new_radius)
    return sorted(set(cut) | set(cutting))


def _shares(d: torch.Tensor, radii: torch.Tensor, others: torch.Tensor, i: int,
            reaches: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The radii that the pairs (others[m], i) at distances d (M,) would share d into, as
    (the earlier entries' shares (M,), entry i's shares (M,)); see `arrive`."""
    if reaches is None:
        half = d / 2.0
        return half, half
    theirs = torch.minimum(reaches[others], radii[others])  # (M,)
    mine = torch.minimum(reaches[i], radii[i]).expand_as(theirs)  # (M,)
    room = d - theirs - mine  # (M,)
    both = theirs + mine  # (M,)
    scale = torch.where(both > 0, d / both.clamp_min(1e-30), torch.zeros_like(d))  # (M,)
    their_share = torch.where(room > 0, theirs + room / 2.0, torch.where(both > 0, theirs * scale, d / 2.0))
    my_share = torch.where(room > 0, mine + room / 2.0, torch.where(both > 0, mine * scale, d / 2.0))
    return their_share, my_share
