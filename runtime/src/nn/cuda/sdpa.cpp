// Fused attention (scaled dot-product attention, forward and backward) through cuDNN's graph API,
// via the cudnn-frontend headers. cuDNN is not linked: `qs_sdpa_load` dlopens the library the
// Rust side found, and the frontend resolves every backend call from that handle
// (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING). Graphs are built once per shape and cached; the
// caller owns the workspace (asked for with a null pointer first).
//
// Layout: Q [b, hq, s, d], K/V [b, hkv, t, d], O and dQ like Q, dK/dV like K, each lying in memory
// as a contiguous [b, h, s, d] or, with `bshd`, as a contiguous [b, s, h, d] (the projections' own
// layout, so no transposes are made around attention); Stats [b, hq, s] f32 (the row log-sum-exp of the scaled, masked scores). Causal is top-left
// (query i sees keys j <= i). With `kv_lens`, row r sees only its first kv_lens[r] keys (right
// padding); every query row is computed.
#include <dlfcn.h>

#include <cudnn_frontend.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

namespace fe = cudnn_frontend;

namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace {

enum : int64_t { Q = 1, K, V, O, STATS, SEQ_Q, SEQ_KV, D_O, D_Q, D_K, D_V };

struct Shape {
    int64_t b, hq, hkv, s, t, d;
    int bf16, causal, padded, backward, sm, bshd;
    float scale;
    auto key() const {
        return std::make_tuple(b, hq, hkv, s, t, d, bf16, causal, padded, backward, sm, bshd, scale);
    }
    bool operator<(const Shape &o) const { return key() < o.key(); }
};

struct Built {
    fe::graph::Graph graph;
    int64_t workspace = 0;
};

// Keyed by (context, stream): candle gives every device the same per-thread stream handle, so the
// stream alone does not say which GPU.
using Where = std::pair<void *, void *>;
std::mutex lock;
std::map<std::pair<Where, Shape>, std::unique_ptr<Built>> graphs;
std::map<std::pair<Where, Shape>, std::string> unbuildable;  // shapes cuDNN has no plan for, and why
std::map<Where, cudnnHandle_t> handles;

void say(char *err, size_t n, const std::string &m) {
    if (n) std::snprintf(err, n, "%s", m.c_str());
}

// Strides of a [b, h, s, d] tensor that lies as [b, h, s, d] or (bshd) as [b, s, h, d].
std::vector<int64_t> strides(int bshd, int64_t h, int64_t s, int64_t d) {
    if (bshd) return {s * h * d, d, h * d, 1};
    return {h * s * d, s * d, d, 1};
}

std::shared_ptr<fe::graph::Tensor_attributes> bhsd(fe::graph::Graph &g, const char *name, int64_t uid, int bshd,
                                                   int64_t b, int64_t h, int64_t s, int64_t d) {
    return g.tensor(
        fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({b, h, s, d}).set_stride(strides(bshd, h, s, d)));
}

template <class Options>
void mask(fe::graph::Graph &g, const Shape &x, Options &opt) {
    if (x.causal) opt.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
    if (!x.padded) return;
    auto lens = [&](const char *name, int64_t uid) {
        return g.tensor(fe::graph::Tensor_attributes()
                            .set_name(name)
                            .set_uid(uid)
                            .set_dim({x.b, 1, 1, 1})
                            .set_stride({1, 1, 1, 1})
                            .set_data_type(fe::DataType_t::INT32));
    };
    opt.set_padding_mask(true).set_seq_len_q(lens("seq_q", SEQ_Q)).set_seq_len_kv(lens("seq_kv", SEQ_KV));
}

std::unique_ptr<Built> build(cudnnHandle_t h, const Shape &x, std::string &why) {
    auto out = std::make_unique<Built>();
    auto &g = out->graph;
    g.set_io_data_type(x.bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    // The engine launches on one stream and never captures it: no CUDA-graph bookkeeping, and
    // nothing that needs libcudart at execute time.
    g.set_cuda_graph_retention(fe::CudaGraphRetention_t::NONE);
    g.set_sm_version(x.sm);  // from the caller, so the frontend asks libcudart nothing
    auto q = bhsd(g, "Q", Q, x.bshd, x.b, x.hq, x.s, x.d);
    auto k = bhsd(g, "K", K, x.bshd, x.b, x.hkv, x.t, x.d);
    auto v = bhsd(g, "V", V, x.bshd, x.b, x.hkv, x.t, x.d);
    auto stats_dims = std::vector<int64_t>{x.b, x.hq, x.s, 1};
    auto stats_strides = std::vector<int64_t>{x.hq * x.s, x.s, 1, 1};
    if (!x.backward) {
        auto opt = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_attn_scale(x.scale);
        mask(g, x, opt);
        auto [o, stats] = g.sdpa(q, k, v, opt);
        o->set_output(true).set_uid(O).set_dim({x.b, x.hq, x.s, x.d}).set_stride(strides(x.bshd, x.hq, x.s, x.d));
        stats->set_output(true).set_uid(STATS).set_data_type(fe::DataType_t::FLOAT).set_dim(stats_dims).set_stride(
            stats_strides);
    } else {
        auto o = bhsd(g, "O", O, x.bshd, x.b, x.hq, x.s, x.d);
        auto d_o = bhsd(g, "dO", D_O, x.bshd, x.b, x.hq, x.s, x.d);
        auto stats = g.tensor(fe::graph::Tensor_attributes()
                                  .set_name("stats")
                                  .set_uid(STATS)
                                  .set_dim(stats_dims)
                                  .set_stride(stats_strides)
                                  .set_data_type(fe::DataType_t::FLOAT));
        auto opt = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward").set_attn_scale(x.scale);
        mask(g, x, opt);
        auto [dq, dk, dv] = g.sdpa_backward(q, k, v, o, d_o, stats, opt);
        dq->set_output(true).set_uid(D_Q).set_dim({x.b, x.hq, x.s, x.d}).set_stride(strides(x.bshd, x.hq, x.s, x.d));
        dk->set_output(true).set_uid(D_K).set_dim({x.b, x.hkv, x.t, x.d}).set_stride(strides(x.bshd, x.hkv, x.t, x.d));
        dv->set_output(true).set_uid(D_V).set_dim({x.b, x.hkv, x.t, x.d}).set_stride(strides(x.bshd, x.hkv, x.t, x.d));
    }
    fe::error_t e;
    if (!(e = g.validate()).is_good() || !(e = g.build_operation_graph(h)).is_good() ||
        !(e = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_good() ||
        !(e = g.check_support()).is_good() || !(e = g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE)).is_good() ||
        !(e = g.get_workspace_size(out->workspace)).is_good()) {
        why = e.get_message();
        return nullptr;
    }
    return out;
}

}  // namespace

extern "C" {

// Opens cuDNN at `path` and returns its version (e.g. 91900); takes it for the frontend only when
// the version is at least `min`, else closes it. 0 with `err` filled when it cannot be opened.
int qs_sdpa_load(const char *path, int min, char *err, size_t n) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        say(err, n, e ? e : "dlopen failed");
        return 0;
    }
    // Asked directly: the frontend caches each symbol on first use, so it must not see a
    // library that is then rejected.
    auto version = reinterpret_cast<size_t (*)()>(dlsym(h, "cudnnGetVersion"));
    if (!version) {
        say(err, n, "no cudnnGetVersion in this library");
        dlclose(h);
        return 0;
    }
    int v = static_cast<int>(version());
    if (v < min) {
        dlclose(h);
        return v;
    }
    fe::cudnn_dlhandle = h;
    return v;
}

// One attention pass on `stream` (the caller made the stream's context current) of a GPU of
// compute capability `sm` (90 for sm_90), every tensor laid out as `bshd` says (see the top). ptrs: forward
// {q, k, v, o, stats}, backward {q, k, v, o, dO, stats, dq, dk, dv}; kv_lens: device int32 [b]
// when padded (used for both the query and key lengths: queries are never padded, see above, so
// seq_q gets `q_lens`, a device int32 [b] of s). With workspace == null, writes the bytes needed to
// *workspace_size and returns 0 without running. Returns 0, or -1 with `err` filled.
int qs_sdpa_run(void *context, void *stream, int sm, int64_t b, int64_t hq, int64_t hkv, int64_t s, int64_t t, int64_t d,
                float scale, int bf16, int causal, int backward, int bshd, void *const *ptrs, void *q_lens, void *kv_lens, void *workspace,
                int64_t *workspace_size, char *err, size_t n) {
    try {
        std::lock_guard<std::mutex> guard(lock);
        Shape x{b, hq, hkv, s, t, d, bf16, causal, kv_lens != nullptr, backward, sm, bshd, scale};
        Where at{context, stream};
        auto &h = handles[at];
        if (!h) {
            if (fe::detail::create_handle(&h) != CUDNN_STATUS_SUCCESS) {
                h = nullptr;
                say(err, n, "cudnnCreate failed");
                return -1;
            }
        }
        if (fe::detail::set_stream(h, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS) {
            say(err, n, "cudnnSetStream failed");
            return -1;
        }
        auto failed = unbuildable.find({at, x});
        if (failed != unbuildable.end()) {
            say(err, n, failed->second);
            return -1;
        }
        auto &slot = graphs[{at, x}];
        if (!slot) {
            std::string why;
            slot = build(h, x, why);
            if (!slot) {
                graphs.erase({at, x});
                unbuildable[{at, x}] = "cuDNN has no attention plan for this shape: " + why;
                say(err, n, unbuildable[{at, x}]);
                return -1;
            }
        }
        if (!workspace) {
            *workspace_size = slot->workspace;
            return 0;
        }
        std::unordered_map<int64_t, void *> pack;
        const int64_t fwd[] = {Q, K, V, O, STATS};
        const int64_t bwd[] = {Q, K, V, O, D_O, STATS, D_Q, D_K, D_V};
        if (backward) {
            for (int i = 0; i < 9; i++) pack[bwd[i]] = ptrs[i];
        } else {
            for (int i = 0; i < 5; i++) pack[fwd[i]] = ptrs[i];
        }
        if (kv_lens) {
            pack[SEQ_Q] = q_lens;
            pack[SEQ_KV] = kv_lens;
        }
        auto e = slot->graph.execute(h, pack, workspace);
        if (!e.is_good()) {
            say(err, n, e.get_message());
            return -1;
        }
        return 0;
    } catch (const std::exception &x) {
        say(err, n, x.what());
        return -1;
    }
}

}  // extern "C"
