// Python bindings of the native kernels: the extension module minidiff._native.
//
// Every array argument is `noconvert`: a float32 array goes to the float overload, a float64
// array to the double one, and anything else (other dtype, non-contiguous) is a TypeError rather
// than a silent copy or cast. The Python wrappers in minidiff/kernels/ make inputs contiguous.
// Shapes are checked again here because a wrong one would mean reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
carray<T> empty(std::vector<py::ssize_t> shape) {
    return carray<T>(shape);
}

void require(bool ok, const std::string& message) {
    if (!ok) throw py::value_error(message);
}

minidiff::ConvGeometry conv_geometry(const char* fn, int64_t N, int64_t C, int64_t H, int64_t W,
                                     int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                     int64_t pw) {
    require(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0,
            std::string(fn) + ": need kernel >= 1, stride >= 1, padding >= 0");
    // Check before dividing: C++ division truncates toward zero, so -1 / 2 would give Ho = 1.
    require(H + 2 * ph >= kh && W + 2 * pw >= kw,
            std::string(fn) + ": the kernel does not fit the padded input");
    return {N, C, H, W, kh, kw, sh, sw, ph, pw, (H + 2 * ph - kh) / sh + 1, (W + 2 * pw - kw) / sw + 1};
}

template <typename T>
carray<T> im2col(carray<T> x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                 int64_t pw) {
    require(x.ndim() == 4, "im2col: x must have shape (N, C, H, W)");
    const auto g = conv_geometry("im2col", x.shape(0), x.shape(1), x.shape(2), x.shape(3), kh, kw,
                                 sh, sw, ph, pw);
    auto cols = empty<T>({g.N, g.C * kh * kw, g.Ho * g.Wo});
    const T* in = x.data();
    T* out = cols.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::im2col(in, out, g);
    }
    return cols;
}

template <typename T>
carray<T> col2im(carray<T> cols, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
    require(cols.ndim() == 3, "col2im: cols must have shape (N, C*kh*kw, Ho*Wo)");
    const auto g = conv_geometry("col2im", cols.shape(0), C, H, W, kh, kw, sh, sw, ph, pw);
    require(cols.shape(1) == C * kh * kw && cols.shape(2) == g.Ho * g.Wo,
            "col2im: cols does not match the geometry");
    auto x = empty<T>({g.N, C, H, W});
    const T* in = cols.data();
    T* out = x.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::col2im(in, out, g);
    }
    return x;
}

carray<float> conv2d_direct(carray<float> x, carray<float> w, int64_t ph, int64_t pw,
                            std::optional<carray<float>> bias, int64_t sh, int64_t sw) {
    require(w.ndim() == 4 && x.ndim() == 4 && w.shape(1) == x.shape(1),
            "conv2d_direct: need x (N, C, H, W) and weight (O, C, kh, kw) with the same C");
    const int64_t N = x.shape(0), C = x.shape(1), H = x.shape(2), W = x.shape(3);
    const int64_t O = w.shape(0), kh = w.shape(2), kw = w.shape(3);
    require(!bias || (bias->ndim() == 1 && bias->shape(0) == O), "conv2d_direct: bias must have shape (O,)");
    const auto g = conv_geometry("conv2d_direct", N, C, H, W, kh, kw, sh, sw, ph, pw);
    auto y = empty<float>({N, O, g.Ho, g.Wo});
    const float *xp = x.data(), *wp = w.data(), *bp = bias ? bias->data() : nullptr;
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::conv2d_direct(xp, wp, bp, yp, N, C, H, W, O, kh, kw, ph, pw, sh, sw);
    }
    return y;
}

carray<float> conv2d_direct_weight_grad(carray<float> x, carray<float> gy, int64_t kh, int64_t kw,
                                        int64_t ph, int64_t pw, int64_t sh, int64_t sw) {
    require(x.ndim() == 4 && gy.ndim() == 4 && gy.shape(0) == x.shape(0),
            "conv2d_direct_weight_grad: need x (N, C, H, W) and gy (N, O, Ho, Wo) with the same N");
    const int64_t N = x.shape(0), C = x.shape(1), H = x.shape(2), W = x.shape(3), O = gy.shape(1);
    const auto g = conv_geometry("conv2d_direct_weight_grad", N, C, H, W, kh, kw, sh, sw, ph, pw);
    require(gy.shape(2) == g.Ho && gy.shape(3) == g.Wo,
            "conv2d_direct_weight_grad: gy's spatial shape does not match x, the kernel and the padding");
    auto gw = empty<float>({O, C, kh, kw});
    const float *xp = x.data(), *gp = gy.data();
    float* wp = gw.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::conv2d_direct_weight_grad(xp, gp, wp, N, C, H, W, O, kh, kw, ph, pw, sh, sw);
    }
    return gw;
}

// Checks that a (C,) vector has C elements and returns its data (null for None).
template <typename T>
const T* channel_data(const std::optional<carray<T>>& v, int64_t C, const std::string& what) {
    if (!v) return nullptr;
    require(v->ndim() == 1 && v->shape(0) == C, what + " must have shape (C,)");
    return v->data();
}

// The shape checks shared by the group norm bindings (fn names the op in the messages):
// x (N, C, S) with groups dividing C; returns {N, C, S}.
template <typename T>
std::array<int64_t, 3> group_norm_dims(const std::string& fn, const carray<T>& x, int64_t groups) {
    require(x.ndim() == 3, fn + ": x must have shape (N, C, S)");
    const int64_t N = x.shape(0), C = x.shape(1), S = x.shape(2);
    require(groups >= 1 && C % groups == 0 && C * S > 0,
            fn + ": groups must divide C and groups must not be empty");
    return {N, C, S};
}

// ... and for a backward: gy of x's shape, mean and rstd of N * groups elements.
template <typename T>
std::array<int64_t, 3> group_norm_backward_dims(const std::string& fn, const carray<T>& gy,
                                                const carray<T>& x, const carray<T>& mean,
                                                const carray<T>& rstd, int64_t groups) {
    const auto dims = group_norm_dims(fn, x, groups);
    const auto [N, C, S] = dims;
    require(gy.ndim() == 3 && gy.shape(0) == N && gy.shape(1) == C && gy.shape(2) == S,
            fn + ": gy must have the shape of x");
    require(mean.size() == N * groups && rstd.size() == N * groups,
            fn + ": mean and rstd must have N * groups elements");
    return dims;
}

// (gweight, gbias) (C,): the per-sample partial sums (N, C) reduced over N, serially (C * N is
// small), in double, then rounded to T.
template <typename T>
std::pair<carray<T>, carray<T>> sum_over_samples(const std::vector<double>& gw_part,
                                                 const std::vector<double>& gb_part, int64_t N, int64_t C) {
    auto gweight = empty<T>({C});
    auto gbias = empty<T>({C});
    T *gwp = gweight.mutable_data(), *gbp = gbias.mutable_data();
    for (int64_t c = 0; c < C; ++c) {
        double sw = 0.0, sb = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            sw += gw_part[n * C + c];
            sb += gb_part[n * C + c];
        }
        gwp[c] = T(sw);
        gbp[c] = T(sb);
    }
    return {gweight, gbias};
}

// Checks that an optional (N, C) array has that shape and returns its data (null for None).
template <typename T>
const T* sample_channel_data(const std::optional<carray<T>>& v, int64_t N, int64_t C, const std::string& what) {
    if (!v) return nullptr;
    require(v->ndim() == 2 && v->shape(0) == N && v->shape(1) == C, what + " must have shape (N, C)");
    return v->data();
}

// The plain and the fused (+ SiLU, + shift) group norm share their bindings: the checks, the
// allocations and the reduction of the weight gradients; `fused` picks the kernel, and the plain
// ops pass no shift. Weight and bias are both given or both None.
template <typename T>
py::tuple norm_forward(const std::string& fn, bool fused, carray<T> x, std::optional<carray<T>> weight,
                       std::optional<carray<T>> bias, std::optional<carray<T>> shift, int64_t groups,
                       double eps) {
    const auto [N, C, S] = group_norm_dims(fn, x, groups);
    require(weight.has_value() == bias.has_value(), fn + ": weight and bias must both be given or both be None");
    const T* w = channel_data(weight, C, fn + ": weight");
    const T* b = channel_data(bias, C, fn + ": bias");
    const T* sh = sample_channel_data(shift, N, C, fn + ": shift");
    auto y = empty<T>({N, C, S});
    auto mean = empty<T>({N, groups});
    auto rstd = empty<T>({N, groups});
    const T* in = x.data();
    T *yp = y.mutable_data(), *mp = mean.mutable_data(), *rp = rstd.mutable_data();
    {
        py::gil_scoped_release release;
        if (fused)
            minidiff::group_norm_silu_forward(in, w, b, sh, yp, mp, rp, N, C, S, groups, eps);
        else
            minidiff::group_norm_forward(in, w, b, yp, mp, rp, N, C, S, groups, eps);
    }
    return py::make_tuple(y, mean, rstd);
}

// (gx, gweight, gbias, gshift); None for the gradients of arguments that were None.
template <typename T>
py::tuple norm_backward(const std::string& fn, bool fused, carray<T> gy, carray<T> x,
                        std::optional<carray<T>> weight, std::optional<carray<T>> bias,
                        std::optional<carray<T>> shift, carray<T> mean, carray<T> rstd, int64_t groups) {
    const auto [N, C, S] = group_norm_backward_dims(fn, gy, x, mean, rstd, groups);
    const T* w = channel_data(weight, C, fn + ": weight");
    const T* b = channel_data(bias, C, fn + ": bias");
    const T* sh = sample_channel_data(shift, N, C, fn + ": shift");
    auto gx = empty<T>({N, C, S});
    std::vector<double> gw_part(w ? N * C : 0), gb_part(w ? N * C : 0);
    py::object gshift = py::none();
    T* gsp = nullptr;
    if (sh) {
        auto g = empty<T>({N, C});
        gsp = g.mutable_data();
        gshift = g;
    }
    const T *gyp = gy.data(), *xp = x.data(), *mp = mean.data(), *rp = rstd.data();
    T* gxp = gx.mutable_data();
    double *gwp = w ? gw_part.data() : nullptr, *gbp = w ? gb_part.data() : nullptr;
    {
        py::gil_scoped_release release;
        if (fused)
            minidiff::group_norm_silu_backward(gyp, xp, w, b, sh, mp, rp, gxp, gwp, gbp, gsp, N, C, S, groups);
        else
            minidiff::group_norm_backward(gyp, xp, w, mp, rp, gxp, gwp, gbp, N, C, S, groups);
    }
    if (!w) return py::make_tuple(gx, py::none(), py::none(), gshift);
    auto [gweight, gbias] = sum_over_samples<T>(gw_part, gb_part, N, C);
    return py::make_tuple(gx, gweight, gbias, gshift);
}

template <typename T>
py::tuple group_norm_forward(carray<T> x, std::optional<carray<T>> weight,
                             std::optional<carray<T>> bias, int64_t groups, double eps) {
    return norm_forward<T>("group_norm_forward", false, x, weight, bias, std::nullopt, groups, eps);
}

template <typename T>
py::tuple group_norm_backward(carray<T> gy, carray<T> x, std::optional<carray<T>> weight,
                              carray<T> mean, carray<T> rstd, int64_t groups) {
    // the plain backward needs no bias: weight alone scales the gradient
    auto grads = norm_backward<T>("group_norm_backward", false, gy, x, weight, std::nullopt, std::nullopt,
                                  mean, rstd, groups);
    return py::make_tuple(grads[0], grads[1], grads[2]);
}

template <typename T>
py::tuple group_norm_silu_forward(carray<T> x, std::optional<carray<T>> weight,
                                  std::optional<carray<T>> bias, std::optional<carray<T>> shift,
                                  int64_t groups, double eps) {
    return norm_forward<T>("group_norm_silu_forward", true, x, weight, bias, shift, groups, eps);
}

template <typename T>
py::tuple group_norm_silu_backward(carray<T> gy, carray<T> x, std::optional<carray<T>> weight,
                                   std::optional<carray<T>> bias, std::optional<carray<T>> shift,
                                   carray<T> mean, carray<T> rstd, int64_t groups) {
    require(weight.has_value() == bias.has_value(),
            "group_norm_silu_backward: weight and bias must both be given or both be None");
    return norm_backward<T>("group_norm_silu_backward", true, gy, x, weight, bias, shift, mean, rstd, groups);
}

// -- attention.cpp ---------------------------------------------------------------------------

template <typename T>
carray<T> softmax_forward(carray<T> x, double scale, bool parallel) {
    require(x.ndim() == 2 && x.shape(1) >= 1, "softmax_forward: x must have shape (R, L) with L >= 1");
    const int64_t R = x.shape(0), L = x.shape(1);
    auto y = empty<T>({R, L});
    const T* xp = x.data();
    T* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::softmax_forward(xp, T(scale), yp, R, L, parallel);
    }
    return y;
}

template <typename T>
carray<T> softmax_backward(carray<T> gy, carray<T> y, double scale, bool parallel) {
    require(y.ndim() == 2 && y.shape(1) >= 1, "softmax_backward: y must have shape (R, L) with L >= 1");
    require(gy.ndim() == 2 && gy.shape(0) == y.shape(0) && gy.shape(1) == y.shape(1),
            "softmax_backward: gy must have the shape of y");
    const int64_t R = y.shape(0), L = y.shape(1);
    auto gx = empty<T>({R, L});
    const T *gyp = gy.data(), *yp = y.data();
    T* gxp = gx.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::softmax_backward(gyp, yp, T(scale), gxp, R, L, parallel);
    }
    return gx;
}

py::tuple attention_forward(carray<float> q, carray<float> k, carray<float> v, double scale,
                            bool parallel) {
    require(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3,
            "attention_forward: q, k, v must be (B, Lq, D), (B, Lk, D), (B, Lk, Dv)");
    const int64_t B = q.shape(0), Lq = q.shape(1), D = q.shape(2), Lk = k.shape(1), Dv = v.shape(2);
    require(k.shape(0) == B && v.shape(0) == B && k.shape(2) == D && v.shape(1) == Lk && Lk >= 1,
            "attention_forward: expected q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv) with Lk >= 1");
    auto out = empty<float>({B, Lq, Dv});
    auto lse = empty<float>({B, Lq});
    const float *qp = q.data(), *kp = k.data(), *vp = v.data();
    float *op = out.mutable_data(), *lp = lse.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::attention_forward(qp, kp, vp, float(scale), op, lp, B, Lq, Lk, D, Dv, parallel);
    }
    return py::make_tuple(out, lse);
}

template <typename T>
void bind(py::module_& m) {
    m.def("im2col", &im2col<T>, "x"_a.noconvert(), "kh"_a, "kw"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a,
          "Columns (N, C*kh*kw, Ho*Wo) of x (N, C, H, W); see minidiff/kernels/conv.py.");
    m.def("col2im", &col2im<T>, "cols"_a.noconvert(), "C"_a, "H"_a, "W"_a, "kh"_a, "kw"_a, "sh"_a,
          "sw"_a, "ph"_a, "pw"_a, "Adjoint of im2col: x (N, C, H, W) from cols.");
    m.def("group_norm_forward", &group_norm_forward<T>, "x"_a.noconvert(),
          "weight"_a.noconvert().none(true), "bias"_a.noconvert().none(true), "groups"_a, "eps"_a,
          "(y, mean, rstd) for x (N, C, S); see minidiff/kernels/norm.py.");
    m.def("group_norm_backward", &group_norm_backward<T>, "gy"_a.noconvert(), "x"_a.noconvert(),
          "weight"_a.noconvert().none(true), "mean"_a.noconvert(), "rstd"_a.noconvert(),
          "groups"_a, "(gx, gweight, gbias); gweight and gbias are None without weight.");
    m.def("softmax_forward", &softmax_forward<T>, "x"_a.noconvert(), "scale"_a, "parallel"_a,
          "softmax(scale * x) along the rows of x (R, L); see minidiff/kernels/attention.py.");
    m.def("softmax_backward", &softmax_backward<T>, "gy"_a.noconvert(), "y"_a.noconvert(),
          "scale"_a, "parallel"_a, "Gradient wrt x of softmax(scale * x) from its output y.");
    m.def("group_norm_silu_forward", &group_norm_silu_forward<T>, "x"_a.noconvert(),
          "weight"_a.noconvert().none(true), "bias"_a.noconvert().none(true),
          "shift"_a.noconvert().none(true), "groups"_a, "eps"_a,
          "(y, mean, rstd): y = silu(group_norm(x + shift)) for x (N, C, S), shift (N, C) or None.");
    m.def("group_norm_silu_backward", &group_norm_silu_backward<T>, "gy"_a.noconvert(),
          "x"_a.noconvert(), "weight"_a.noconvert().none(true), "bias"_a.noconvert().none(true),
          "shift"_a.noconvert().none(true), "mean"_a.noconvert(), "rstd"_a.noconvert(), "groups"_a,
          "(gx, gweight, gbias, gshift); None for those whose input was None.");
}

// -- diffusion.cpp --------------------------------------------------------------------------
// The Python wrappers (minidiff/kernels/diffusion.py and loss.py) pass flat C-contiguous arrays
// and decide `parallel` by size.

void require_same_size(const py::array& a, const py::array& b, const std::string& message) {
    require(a.size() == b.size(), message);
}

template <typename T>
carray<T> q_sample(carray<T> x0, carray<T> noise, carray<double> sqrt_abar,
                   carray<double> sqrt_one_minus_abar, carray<int64_t> t, bool parallel) {
    require(t.ndim() == 1, "q_sample: t must be 1-D");
    const int64_t N = t.shape(0), size = x0.size();
    require(noise.size() == size && (N ? size % N == 0 : size == 0),
            "q_sample: x0 and noise must hold N rows of one length");
    require(sqrt_abar.ndim() == 1 && sqrt_one_minus_abar.ndim() == 1 &&
                sqrt_abar.shape(0) == sqrt_one_minus_abar.shape(0),
            "q_sample: the tables must be 1-D and of one length");
    const int64_t steps = sqrt_abar.shape(0);
    const int64_t* tp = t.data();
    for (int64_t n = 0; n < N; ++n) {  // never read the tables out of bounds
        if (tp[n] < 0 || tp[n] >= steps)
            throw py::value_error("q_sample: timesteps must lie in [0, " + std::to_string(steps) +
                                  "), got " + std::to_string(tp[n]));
    }
    auto out = empty<T>({size});
    const T *xp = x0.data(), *zp = noise.data();
    const double *ap = sqrt_abar.data(), *sp = sqrt_one_minus_abar.data();
    T* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::q_sample(xp, zp, ap, sp, tp, op, N, N ? size / N : 0, parallel);
    }
    return out;
}

template <typename T>
double squared_error_sum(carray<T> pred, carray<T> target, bool parallel) {
    require_same_size(pred, target, "squared_error_sum: pred and target differ in size");
    const T *pp = pred.data(), *tp = target.data();
    const int64_t n = pred.size();
    py::gil_scoped_release release;
    return minidiff::squared_error_sum(pp, tp, n, parallel);
}

template <typename T>
carray<T> scaled_difference(carray<T> pred, carray<T> target, double scale, bool parallel) {
    require_same_size(pred, target, "scaled_difference: pred and target differ in size");
    const int64_t n = pred.size();
    auto out = empty<T>({n});
    const T *pp = pred.data(), *tp = target.data();
    T* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        minidiff::scaled_difference(pp, tp, T(scale), op, n, parallel);
    }
    return out;
}

template <typename T>
void bind_diffusion(py::module_& m) {
    m.def("q_sample", &q_sample<T>, "x0"_a.noconvert(), "noise"_a.noconvert(),
          "sqrt_abar"_a.noconvert(), "sqrt_one_minus_abar"_a.noconvert(), "t"_a.noconvert(),
          "parallel"_a, "x_t of flat x0, noise (N rows); see minidiff/kernels/diffusion.py.");
    m.def("squared_error_sum", &squared_error_sum<T>, "pred"_a.noconvert(),
          "target"_a.noconvert(), "parallel"_a,
          "Sum of (pred - target)^2 in double, in fixed chunks (deterministic).");
    m.def("scaled_difference", &scaled_difference<T>, "pred"_a.noconvert(),
          "target"_a.noconvert(), "scale"_a, "parallel"_a,
          "(pred - target) * scale, flat, in the arrays' dtype.");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native CPU kernels of minidiff (C++, OpenMP). Use them through minidiff.kernels.";
    bind<float>(m);
    m.def("conv2d_direct", &conv2d_direct, "x"_a.noconvert(), "weight"_a.noconvert(), "ph"_a, "pw"_a,
          "bias"_a.noconvert() = py::none(), "sh"_a = 1, "sw"_a = 1,
          "Convolution of float32 x (N, C, H, W) by weight (O, C, kh, kw) plus bias (O,) or None, "
          "padding (ph, pw), stride (sh, sw), no columns.");
    m.def("conv2d_direct_weight_grad", &conv2d_direct_weight_grad, "x"_a.noconvert(), "gy"_a.noconvert(),
          "kh"_a, "kw"_a, "ph"_a, "pw"_a, "sh"_a = 1, "sw"_a = 1,
          "Weight gradient (O, C, kh, kw) of the float32 convolution, from x and gy.");
    m.attr("conv2d_direct_isa") = minidiff::conv2d_direct_isa();
    m.def("attention_forward", &attention_forward, "q"_a.noconvert(), "k"_a.noconvert(),
          "v"_a.noconvert(), "scale"_a, "parallel"_a,
          "(out, lse): softmax(scale * q k^T) v over float32 (B, L, D) arrays, tile by tile; "
          "see minidiff/kernels/attention.py.");
    m.attr("attention_forward_isa") = minidiff::attention_forward_isa();
    bind<double>(m);
    bind_diffusion<float>(m);
    bind_diffusion<double>(m);
#ifdef _OPENMP
    m.attr("openmp") = true;
    m.def("openmp_max_threads", [] { return omp_get_max_threads(); });
#else
    m.attr("openmp") = false;
    m.def("openmp_max_threads", [] { return 1; });
#endif
}
