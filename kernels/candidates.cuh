// candidates.cuh — the per-row (best index, best score, runner-up score) triple that every
// nearest kernel keeps, and how two of them over disjoint code sets merge. Included by
// nearest.cu and nearest_tc.cu so both resolve ties and runner-ups the same way.
#pragma once

struct Cand {
    unsigned int idx;
    float best;
    float second;
};

// The smaller score wins, the smaller index on equal scores; the runner-up is the smallest of
// the loser's best and the winner's runner-up.
__device__ __forceinline__ Cand merge_cand(Cand a, Cand b) {
    const bool b_wins = (b.best < a.best) || (b.best == a.best && b.idx < a.idx);
    Cand r;
    if (b_wins) {
        r.idx = b.idx;
        r.best = b.best;
        r.second = fminf(b.second, a.best);
    } else {
        r.idx = a.idx;
        r.best = a.best;
        r.second = fminf(a.second, b.best);
    }
    return r;
}
