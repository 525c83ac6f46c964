// dgq::linear's CUDA kernel in C++ (a torch extension; needs torch's headers, not CUDA's).
//
// In eager mode the host's work per linear sets the pace at decode sizes: the Python path (the
// op's Python kernel, three allocations, two ctypes launches) cost twice bf16's whole call
// (docs/integration.md). Here one call makes one allocation for the int8 tokens and their scales,
// one for the output, and launches the quantizer and the GEMV / tensor-core kernel itself.
//
// dgq::rotated_linear (an online-rotated input, ops/rotation.py) takes the same paths with the
// rotation fused into the quantizer (dgq_hadamard_quantize_rows), so x Q never goes to memory, and
// dgq::norm_linear (ops/norm.py) with the RMSNorm before the linear fused into it
// (dgq_rmsnorm_quantize_rows), and dgq::silu_mul_linear (ops/silu_mul.py) with the gated MLP's
// silu(gate) * up (dgq_silu_mul_quantize_rows).
//
// The path is Python's choice (dgqtool.kernels.runtime.choose_path), asked once per (device,
// dtype, M bucket, N, K, group, static scale) through dgq::plan, which answers with the kernel
// entry points' addresses in the library Python loaded; every other path (the wgmma and
// expansion paths, shapes the kernels do not take) goes to the Python kernel, dgq::linear_python.
// The answers stay for the process: DGQ_KERNELS or the tuned table changed later do not reach them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// The kernel library's C entry points (kernels/dgq_w4a8.cu); cudaStream_t is a pointer.
using Quantize = int (*)(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k,
                         void* stream);
using RotatingQuantize = int (*)(const void* x, const float* signs, int8_t* q, float* scale,
                                 const float* static_scale, int m, int k, int t, void* stream);
using NormQuantize = int (*)(const void* x, const void* w, float eps, int8_t* q, float* scale,
                             const float* static_scale, float* inv_rms, int m, int k, void* stream);
using Gemv = int (*)(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                     const float* s_x, void* out, int n, int k, int group, int channels_per_warp, int steps,
                     void* stream);
using Mma = int (*)(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                    const float* s_x, void* out, int m, int n, int k, int group, int channel_tiles, int warps,
                    void* stream);

// dgq::plan's answer: [path, config 0, config 1, quantizer address, GEMM address, rotating quantizer
// address, norm quantizer address, silu-mul quantizer address]
enum Path : int64_t { kPython = 0, kGemv = 1, kMma = 2 };
struct Plan {
  int64_t path = kPython, config0 = 0, config1 = 0;
  Quantize quantize = nullptr;
  void* gemm = nullptr;
  RotatingQuantize rotating = nullptr;
  NormQuantize norm = nullptr;
  Quantize silu_mul = nullptr;  // reads rows of 2k [gate | up]
};
using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, bool>;

int64_t bucket(int64_t m) {  // runtime._bucket: the next power of two
  int64_t b = 1;
  while (b < m) b <<= 1;
  return b;
}

Plan plan_for(const at::Tensor& x, const at::Tensor& qweight, int64_t group, bool is_static) {
  static std::mutex mutex;
  static std::map<Key, Plan> plans;
  const Key key{x.get_device(), static_cast<int>(x.scalar_type()), bucket(x.size(0)), qweight.size(0), x.size(1),
                group, is_static};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = plans.find(key);
    if (found != plans.end()) return found->second;
  }
  static const auto ask = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("dgq::plan", "")
                              .typed<std::vector<int64_t>(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  const std::vector<int64_t> answer = ask.call(x, qweight, group, is_static);  // Python, outside the lock
  Plan plan;
  if (answer.size() == 8 && (answer[0] == kGemv || answer[0] == kMma)) {
    plan.path = answer[0], plan.config0 = answer[1], plan.config1 = answer[2];
    plan.quantize = reinterpret_cast<Quantize>(static_cast<uintptr_t>(answer[3]));
    plan.gemm = reinterpret_cast<void*>(static_cast<uintptr_t>(answer[4]));
    plan.rotating = reinterpret_cast<RotatingQuantize>(static_cast<uintptr_t>(answer[5]));
    plan.norm = reinterpret_cast<NormQuantize>(static_cast<uintptr_t>(answer[6]));
    plan.silu_mul = reinterpret_cast<Quantize>(static_cast<uintptr_t>(answer[7]));
  }
  std::lock_guard<std::mutex> lock(mutex);
  plans.emplace(key, plan);
  return plan;
}

void check(int status, const char* what) {
  static const char* const kErrors[] = {"ok", "shape not supported", "workspace too small", "CUDA launch failed"};
  TORCH_CHECK(status == 0, what, ": ", status > 0 && status < 4 ? kErrors[status] : "unknown error");
}

// Quantizes the input into the (m, k) int8 tokens and their scales (one allocation) with
// `quantize`, then runs the plan's GEMV or tensor-core kernel on them; k: the linear's in features
// (the input's columns, or half of them for [gate | up]).
template <typename QuantizeInto>
at::Tensor quantize_and_multiply(const Plan& plan, const at::Tensor& input, const at::Tensor& qweight,
                                 const at::Tensor& scales_s2, const at::Tensor& qzeros, const at::Tensor& scales_s1,
                                 int64_t group, const std::optional<at::Tensor>& input_scale, QuantizeInto quantize,
                                 int64_t features = -1) {
  const int m = static_cast<int>(input.size(0)), k = static_cast<int>(features < 0 ? input.size(1) : features);
  const int n = static_cast<int>(qweight.size(0));
  // the int8 tokens, then their float scales: m * k is a multiple of 32, so the scales stay aligned
  at::Tensor tokens = at::empty({static_cast<int64_t>(m) * k + 4 * m}, input.options().dtype(at::kChar));
  int8_t* codes = static_cast<int8_t*>(tokens.data_ptr());
  float* scales = reinterpret_cast<float*>(codes + static_cast<int64_t>(m) * k);
  std::optional<at::Tensor> fixed;
  if (input_scale.has_value()) fixed = input_scale->to(at::kFloat).contiguous();
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(input.device()).native_handle();
  check(quantize(codes, scales, fixed ? fixed->data_ptr<float>() : nullptr, m, k, stream), "dgq quantize");
  at::Tensor out = at::empty({m, n}, input.options());
  const auto* s2 = static_cast<const int8_t*>(scales_s2.data_ptr());
  const auto* zp = static_cast<const uint8_t*>(qzeros.data_ptr());
  const int cfg0 = static_cast<int>(plan.config0), cfg1 = static_cast<int>(plan.config1), g = static_cast<int>(group);
  if (plan.path == kGemv) {
    check(reinterpret_cast<Gemv>(plan.gemm)(qweight.data_ptr(), s2, zp, scales_s1.data_ptr(), codes, scales,
                                            out.data_ptr(), n, k, g, cfg0, cfg1, stream),
          "dgq gemv");
  } else {
    check(reinterpret_cast<Mma>(plan.gemm)(qweight.data_ptr(), s2, zp, scales_s1.data_ptr(), codes, scales,
                                           out.data_ptr(), m, n, k, g, cfg0, cfg1, stream),
          "dgq mma");
  }
  return out;
}

// K % 32 keeps the scales after the int8 tokens aligned (the kernels need it anyway); M = 0 goes
// to Python, so that an empty batch never decides the plan of its bucket (bucket(0) = 1)
Plan plan_if_native(const at::Tensor& x, const at::Tensor& qweight, int64_t group, bool is_static) {
  const bool runs_here = x.dim() == 2 && x.size(0) > 0 && x.size(1) % 32 == 0;
  return runs_here ? plan_for(x, qweight, group, is_static) : Plan{};
}

// The op's Python kernel (dgq::<op>_python): the inputs and paths this file does not take.
template <typename Signature>
c10::TypedOperatorHandle<Signature> python_kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
using Optional = const std::optional<at::Tensor>&;
using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, Optional, Optional);

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_s2,
                       const at::Tensor& qzeros, const at::Tensor& scales_s1, int64_t group,
                       const std::optional<at::Tensor>& input_scale, const std::optional<at::Tensor>& w_s8) {
  const Plan plan = plan_if_native(x, qweight, group, input_scale.has_value());
  if (plan.path == kPython) {
    static const auto python = python_kernel<LinearSignature>("dgq::linear_python");
    return python.call(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8);
  }
  const c10::DeviceGuard device_guard(x.device());  // the kernels launch on the current device
  const at::Tensor input = x.contiguous();
  return quantize_and_multiply(plan, input, qweight, scales_s2, qzeros, scales_s1, group, input_scale,
                               [&](int8_t* codes, float* scales, const float* fixed, int m, int k, void* stream) {
                                 return plan.quantize(input.data_ptr(), codes, scales, fixed, m, k, stream);
                               });
}

// The fused rotating quantizer takes Sylvester blocks of 64 / 128 / 256, at most 64 of them a row
// (ops/rotation.py MAX_FUSED_BLOCKS); everything else goes to the Python kernel.
at::Tensor rotated_linear_cuda(const at::Tensor& x, const at::Tensor& signs, int64_t block, const at::Tensor& qweight,
                               const at::Tensor& scales_s2, const at::Tensor& qzeros, const at::Tensor& scales_s1,
                               int64_t group, const std::optional<at::Tensor>& input_scale,
                               const std::optional<at::Tensor>& w_s8) {
  const bool fused_block = (block == 64 || block == 128 || block == 256) && x.dim() == 2 && x.size(1) % block == 0 &&
                           x.size(1) / block <= 64 && signs.scalar_type() == at::kFloat && signs.is_contiguous() &&
                           signs.dim() == 1 && signs.numel() == x.size(1) && signs.device() == x.device();
  const Plan plan = fused_block ? plan_if_native(x, qweight, group, input_scale.has_value()) : Plan{};
  if (plan.path == kPython || plan.rotating == nullptr) {
    static const auto python = python_kernel<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        int64_t, Optional, Optional)>("dgq::rotated_linear_python");
    return python.call(x, signs, block, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8);
  }
  const c10::DeviceGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();
  const int t = static_cast<int>(block);
  return quantize_and_multiply(plan, input, qweight, scales_s2, qzeros, scales_s1, group, input_scale,
                               [&](int8_t* codes, float* scales, const float* fixed, int m, int k, void* stream) {
                                 return plan.rotating(input.data_ptr(), signs.data_ptr<float>(), codes, scales, fixed,
                                                      m, k, t, stream);
                               });
}

// The fused norm takes 16-bit rows of at most 65536 features with a 16-byte aligned weight of their
// dtype (runtime.norm_fusable); everything else goes to the Python kernel.
at::Tensor norm_linear_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& qweight,
                            const at::Tensor& scales_s2, const at::Tensor& qzeros, const at::Tensor& scales_s1,
                            int64_t group, const std::optional<at::Tensor>& input_scale,
                            const std::optional<at::Tensor>& w_s8) {
  const bool fusable = x.dim() == 2 && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
                       weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.numel() == x.size(1) &&
                       weight.is_contiguous() && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0 &&
                       weight.device() == x.device() && x.size(1) <= 65536;
  const Plan plan = fusable ? plan_if_native(x, qweight, group, input_scale.has_value()) : Plan{};
  if (plan.path == kPython || plan.norm == nullptr) {
    static const auto python = python_kernel<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        int64_t, Optional, Optional)>("dgq::norm_linear_python");
    return python.call(x, weight, eps, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8);
  }
  const c10::DeviceGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();
  const float epsilon = static_cast<float>(eps);
  return quantize_and_multiply(plan, input, qweight, scales_s2, qzeros, scales_s1, group, input_scale,
                               [&](int8_t* codes, float* scales, const float* fixed, int m, int k, void* stream) {
                                 return plan.norm(input.data_ptr(), weight.data_ptr(), epsilon, codes, scales, fixed,
                                                  nullptr, m, k, stream);
                               });
}

// x (m, 2k) = [gate | up]: 16-bit rows whose halves are whole 32-feature words, k <= 65536
// (runtime.silu_mul_fusable); the plan is the linear's, asked with its (m, k) input's shape.
at::Tensor silu_mul_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_s2,
                                const at::Tensor& qzeros, const at::Tensor& scales_s1, int64_t group,
                                const std::optional<at::Tensor>& input_scale, const std::optional<at::Tensor>& w_s8) {
  const bool fusable = x.dim() == 2 && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
                       x.size(1) % 64 == 0 && x.size(1) / 2 <= 65536;
  const int64_t k = fusable ? x.size(1) / 2 : 0;
  const Plan plan = fusable ? plan_if_native(x.narrow(1, 0, k), qweight, group, input_scale.has_value()) : Plan{};
  if (plan.path == kPython || plan.silu_mul == nullptr) {
    static const auto python = python_kernel<LinearSignature>("dgq::silu_mul_linear_python");
    return python.call(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8);
  }
  const c10::DeviceGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();
  return quantize_and_multiply(
      plan, input, qweight, scales_s2, qzeros, scales_s1, group, input_scale,
      [&](int8_t* codes, float* scales, const float* fixed, int m, int features, void* stream) {
        return plan.silu_mul(input.data_ptr(), codes, scales, fixed, m, features, stream);
      },
      k);
}

}  // namespace

TORCH_LIBRARY_IMPL(dgq, CUDA, m) {
  m.impl("linear", TORCH_FN(linear_cuda));
  m.impl("rotated_linear", TORCH_FN(rotated_linear_cuda));
  m.impl("norm_linear", TORCH_FN(norm_linear_cuda));
  m.impl("silu_mul_linear", TORCH_FN(silu_mul_linear_cuda));
}
