// candidates.cuh — the per-row (best index, best score, runner-up score) triple that every
// nearest kernel keeps, how a code's score folds into it and how two of them over disjoint
// code sets (or warp lanes) merge. Included by nearest.cu and nearest_tc.cu so both resolve
// ties and runner-ups the same way.
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

// A thread's running candidates of its 8 rows before any code: index 0, scores +inf.
__device__ __forceinline__ void init_cands(unsigned int (&bi)[8], float (&bs)[8], float (&ss)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        bi[i] = 0u;
        bs[i] = __int_as_float(0x7f800000);  // +inf
        ss[i] = __int_as_float(0x7f800000);
    }
}

// Folds code kc's score s into one row's running candidates. Codes reach a thread in increasing
// order: strict < keeps the first of equal scores.
__device__ __forceinline__ void fold_score(unsigned int& bi, float& bs, float& ss, float s,
                                           unsigned int kc) {
    const float hi = fmaxf(bs, s);
    bi = (s < bs) ? kc : bi;
    bs = fminf(bs, s);
    ss = fminf(ss, hi);
}

// c merged with the candidates of the lane `off` away (xor) in the warp.
__device__ __forceinline__ Cand shfl_merge_cand(Cand c, int off) {
    Cand o;
    o.idx = __shfl_xor_sync(0xffffffffu, c.idx, off);
    o.best = __shfl_xor_sync(0xffffffffu, c.best, off);
    o.second = __shfl_xor_sync(0xffffffffu, c.second, off);
    return merge_cand(c, o);
}
