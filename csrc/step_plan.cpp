// The step plan: the op calls of the last step, their arguments converted once, repeated by the
// next step with only the grads and the per-step values changed.
//
// A step hands the dispatcher every tensor of every param as Python lists, and converting those
// lists (and later destroying the converted copies, each of which re-takes the GIL for a tensor
// that Python owns too) costs microseconds per param: far more than the kernels of a small
// model. The plan keeps the tensor lists as the kernels take them and calls the ops' unboxed
// form (signatures in csrc/schemas.h), so a call copies no tensor at all. It reads each param's
// grad in C++ and checks it against what the plan was made with; any difference sends the step
// back to the full Python path (fused_opt/optimizer.py), which checks and reports as always and
// makes a new plan.
#include <ATen/core/boxing/impl/make_boxed_from_unboxed_functor.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include "fused_opt/prefetch.h"
#include "schemas.h"

#include <c10/util/SmallVector.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fused_opt {

namespace py = pybind11;

namespace {

// How far ahead gather_grads asks for a param's TensorImpl, its autograd metadata (where its
// grad is) and its grad's TensorImpl, and StateEntries for a state dict and its table
// (fused_opt/prefetch.h); each nearer distance needs the object fetched at the one before. On
// 4,096 one-element AdamW params, one thread, this project's 2-core AMD EPYC, right after
// torch's fused AdamW over other params: gather_grads took 435 us against 511 (medians of 200
// alternating steps of one process), a whole step 0.96-0.98x the time; a repeating step
// 1.00-1.01x.
constexpr size_t kParamsAhead = 12;
constexpr size_t kMetaAhead = 8;
constexpr size_t kGradsAhead = 4;
constexpr size_t kDictsAhead = 8;
constexpr size_t kTablesAhead = 4;
// A small dict's table: its header, indices and a handful of entries.
constexpr size_t kDictTableBytes = 3 * kCacheLine;

// What a param was when the plan was made: a grad must still match it, and the param itself
// must not have been given other data of another dtype, device or layout (`param.data = ...`).
struct PlannedParam {
  at::Tensor param;
  at::ScalarType dtype;
  at::Device device;
  // Inline up to four dimensions: a step over thousands of small params waits on each memory
  // load it cannot predict, and a vector's elements would be one more allocation to fetch.
  c10::SmallVector<int64_t, 4> sizes;
  c10::SmallVector<int64_t, 4> strides;

  explicit PlannedParam(at::Tensor p)
      : param(std::move(p)),
        dtype(param.scalar_type()),
        device(param.device()),
        sizes(param.sizes().begin(), param.sizes().end()),
        strides(param.strides().begin(), param.strides().end()) {}

  bool unchanged() const {
    return param.scalar_type() == dtype && param.device() == device &&
           param.sizes() == c10::IntArrayRef(sizes) &&
           (param.numel() <= 1 || param.strides() == c10::IntArrayRef(strides));
  }

  // The grad the op would take as it is: a grad of another layout the full path copies first.
  bool fits(const at::Tensor& grad) const {
    return grad.defined() && grad.layout() == at::kStrided && grad.scalar_type() == dtype &&
           grad.device() == device && grad.sizes() == c10::IntArrayRef(sizes) &&
           (grad.numel() <= 1 || grad.strides() == c10::IntArrayRef(strides));
  }
};

// The optimizer's state as the plan was made from it: the entries of its `state` dict in order,
// and the entries of each param's state dict. A param's state dict or one of its state tensors
// replaced by another object (a momentum reset, say) changes which tensors the step must take,
// which the plan's lists would not see; one changed in place needs nothing. Compared by identity,
// walking the dicts as they are stored: a lookup would hash each param through Python.
class StateEntries {
 public:
  explicit StateEntries(const py::dict& state) : state_(state) {
    PyObject* key;
    PyObject* value;
    Py_ssize_t position = 0;
    while (PyDict_Next(state_.ptr(), &position, &key, &value)) {
      entries_.push_back(entry(key, value));
      const size_t first = nested_.size();
      if (PyDict_Check(value)) {
        PyObject* nested_key;
        PyObject* nested_value;
        Py_ssize_t nested_position = 0;
        while (PyDict_Next(value, &nested_position, &nested_key, &nested_value)) {
          nested_.push_back(entry(nested_key, nested_value));
        }
      }
      nested_ranges_.emplace_back(first, nested_.size());
    }
  }

  bool unchanged() const {
    if (static_cast<size_t>(PyDict_Size(state_.ptr())) != entries_.size()) return false;
    PyObject* key;
    PyObject* value;
    Py_ssize_t position = 0;
    for (size_t i = 0; PyDict_Next(state_.ptr(), &position, &key, &value); ++i) {
      prefetch_dict_ahead(i);
      if (key != entries_[i].first.ptr() || value != entries_[i].second.ptr()) return false;
      if (!PyDict_Check(value)) continue;
      const auto [first, last] = nested_ranges_[i];
      if (static_cast<size_t>(PyDict_Size(value)) != last - first) return false;
      PyObject* nested_key;
      PyObject* nested_value;
      Py_ssize_t nested_position = 0;
      for (size_t j = first; PyDict_Next(value, &nested_position, &nested_key, &nested_value);
           ++j) {
        if (nested_key != nested_[j].first.ptr() || nested_value != nested_[j].second.ptr()) {
          return false;
        }
      }
    }
    return true;
  }

 private:
  using Entry = std::pair<py::object, py::object>;

  // A param's state dict is two objects of its own (the dict and its table of entries), each a
  // miss when the step comes cold: the dict of the entry kDictsAhead on is asked for, and the
  // table of a nearer one, whose dict has arrived by then.
  void prefetch_dict_ahead(size_t i) const {
    if (i + kDictsAhead < entries_.size()) {
      __builtin_prefetch(entries_[i + kDictsAhead].second.ptr());
    }
    if (i + kTablesAhead < entries_.size()) {
      PyObject* nested = entries_[i + kTablesAhead].second.ptr();
      if (PyDict_Check(nested)) {
        prefetch_lines(reinterpret_cast<PyDictObject*>(nested)->ma_keys, kDictTableBytes);
      }
    }
  }

  static Entry entry(PyObject* key, PyObject* value) {
    return {py::reinterpret_borrow<py::object>(key), py::reinterpret_borrow<py::object>(value)};
  }

  py::dict state_;
  std::vector<Entry> entries_;
  // Per entry of `state`, the range of `nested_` that holds its dict's entries.
  std::vector<std::pair<size_t, size_t>> nested_ranges_;
  std::vector<Entry> nested_;
};

struct PlannedCall;
using Invoke = void (*)(PlannedCall&, torch::jit::Stack&);

struct PlannedCall {
  c10::OperatorHandle op;
  // The op's typed handle (a c10::TypedOperatorHandle of the signature `invoke` calls with).
  std::shared_ptr<const void> typed;
  Invoke invoke;
  // Every argument but the tensor lists, which are in `lists` at the same position.
  torch::jit::Stack arguments;
  std::vector<std::vector<at::Tensor>> lists;
  // The call's grads argument, refilled from `params` each step.
  size_t grads_index;
  std::vector<size_t> params;
  // The arguments a step passes by name, with the types to convert them to.
  std::unordered_map<std::string, std::pair<size_t, c10::TypePtr>> by_name;
  // Those without a default that add_call was not given: every call() must pass them.
  std::vector<size_t> per_call;
};

// Argument `i` of a call as the kernel takes it: a tensor list as the plan keeps it, anything
// else converted from the call's own copy of the stack (which the conversion may move from).
template <class T>
decltype(auto) unboxed(PlannedCall& call, torch::jit::Stack& stack, size_t i) {
  if constexpr (std::is_same_v<T, at::TensorList>) {
    return at::TensorList(call.lists[i]);
  } else {
    return c10::impl::ivalue_to_arg<typename c10::impl::decay_if_not_tensor<T>::type,
                                    false>::call(stack[i]);
  }
}

template <class Signature>
struct Unboxed;
template <class... Args>
struct Unboxed<void(Args...)> {
  using Typed = c10::TypedOperatorHandle<void(Args...)>;

  // typed() checks the signature against the op's schema: once, when the call is planned.
  static void plan(PlannedCall& call) {
    call.typed = std::make_shared<const Typed>(call.op.typed<void(Args...)>());
    call.invoke = &invoke;
  }

  static void invoke(PlannedCall& call, torch::jit::Stack& stack) {
    invoke_with(*static_cast<const Typed*>(call.typed.get()), call, stack,
                std::index_sequence_for<Args...>{});
  }

  template <size_t... I>
  static void invoke_with(const Typed& typed, PlannedCall& call, torch::jit::Stack& stack,
                          std::index_sequence<I...>) {
    typed.call(unboxed<Args>(call, stack, I)...);
  }
};

// Makes `call` an unboxed call of its op, found by its name within its library (fused_opt, or
// the emulation tier's fused_opt_simt, whose ops have the same schemas and kernels' signatures).
void plan_unboxed(const std::string& op_name, PlannedCall& call) {
  static const std::unordered_map<std::string, void (*)(PlannedCall&)> planners = {
      {"adam_", &Unboxed<signatures::Adam>::plan},
      {"sgd_", &Unboxed<signatures::Sgd>::plan},
      {"rmsprop_", &Unboxed<signatures::Rmsprop>::plan},
      {"adagrad_", &Unboxed<signatures::Adagrad>::plan},
      {"grad_norm_", &Unboxed<signatures::GradNorm>::plan},
  };
  const auto found = planners.find(op_name.substr(op_name.find("::") + 2));
  TORCH_CHECK(found != planners.end(), "StepPlan: no unboxed call of ", op_name);
  found->second(call);
}

}  // namespace

class StepPlan {
 public:
  // `idle` are the params that had no grad: a grad appearing on one changes the plan.
  // `versioned` are the params with a master weight and the version counters the masters were
  // last brought in line with. `state` is the optimizer's state dict (see StateEntries).
  StepPlan(const std::vector<at::Tensor>& idle,
           const std::vector<std::pair<at::Tensor, int64_t>>& versioned, const py::dict& state)
      : idle_(idle), versioned_(versioned), state_(state) {}

  // Adds the op call `op_name`(*args, **kwargs) for the params `params`, whose grads are the
  // argument named "grads"; arguments without a default left out here must come with every
  // call(). Returns the call's index.
  size_t add_call(const std::string& op_name, const std::vector<at::Tensor>& params,
                  const py::list& args, const py::dict& kwargs) {
    const auto separator = op_name.find("::");
    TORCH_CHECK(separator != std::string::npos, "StepPlan: '", op_name, "' is not namespace::op");
    PlannedCall call{c10::Dispatcher::singleton().findSchemaOrThrow(op_name.c_str(), "")};
    plan_unboxed(op_name, call);
    const c10::FunctionSchema& schema = call.op.schema();
    const auto& schema_args = schema.arguments();
    TORCH_CHECK(args.size() <= schema_args.size(), "StepPlan: too many arguments for ", op_name);
    bool has_grads = false;
    for (size_t i = 0; i < schema_args.size(); ++i) {
      const c10::Argument& arg = schema_args[i];
      call.lists.emplace_back();
      if (arg.name() == "grads") {
        call.grads_index = i;
        call.arguments.emplace_back();
        has_grads = true;
      } else if (i < args.size()) {
        c10::IValue value = torch::jit::toIValue(args[i], arg.real_type());
        if (value.isTensorList()) {
          call.lists.back() = value.toTensorVector();
          call.arguments.emplace_back();
        } else {
          call.arguments.push_back(std::move(value));
        }
      } else if (kwargs.contains(arg.name().c_str())) {
        call.arguments.push_back(
            torch::jit::toIValue(kwargs[arg.name().c_str()], arg.real_type()));
      } else if (arg.default_value().has_value()) {
        call.arguments.push_back(*arg.default_value());
      } else {
        call.arguments.emplace_back();
        call.per_call.push_back(i);
      }
      call.by_name.emplace(arg.name(), std::make_pair(i, arg.real_type()));
    }
    TORCH_CHECK(has_grads, "StepPlan: ", op_name, " takes no grads");
    call.params.reserve(params.size());
    for (const at::Tensor& p : params) call.params.push_back(index_of(p));
    calls_.push_back(std::move(call));
    return calls_.size() - 1;
  }

  // Reads every param's grad; false, with nothing kept, when the plan no longer fits: a grad
  // missing, new, or of another dtype, device, shape or layout, a param changed, a param with a
  // master written since its master was last brought in line, or the state replaced in part.
  bool gather_grads() {
    release_grads();
    if (!state_.unchanged()) return false;
    for (const at::Tensor& p : idle_) {
      if (p.unsafeGetTensorImpl()->grad().defined()) return false;
    }
    for (const auto& [p, version] : versioned_) {
      if (p._version() != version) return false;
    }
    grads_.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      prefetch_grad_ahead(i);
      const PlannedParam& planned = params_[i];
      // The TensorImpl's own grad: Tensor::grad() first asks autograd whether the param is a
      // leaf, for a warning no optimizer's param can trigger (optimizers take leaves only).
      const at::Tensor& grad = planned.param.unsafeGetTensorImpl()->grad();
      if (!planned.unchanged() || !planned.fits(grad)) {
        release_grads();
        return false;
      }
      grads_.push_back(grad);
    }
    return true;
  }

  // Runs call `index` with the grads of the last gather_grads() and, in place of the planned
  // ones, the arguments in `kwargs`.
  void call(size_t index, const py::dict& kwargs) {
    TORCH_CHECK(index < calls_.size(), "StepPlan: no call ", index);
    TORCH_CHECK(!grads_.empty(), "StepPlan: call() needs gather_grads() first");
    PlannedCall& planned = calls_[index];
    std::vector<at::Tensor>& grads = planned.lists[planned.grads_index];
    grads.clear();
    for (size_t i : planned.params) grads.push_back(grads_[i]);
    torch::jit::Stack stack = planned.arguments;
    for (size_t i : planned.per_call) {
      const char* name = planned.op.schema().arguments()[i].name().c_str();
      TORCH_CHECK(kwargs.contains(name), "StepPlan: a call of ", planned.op.schema().name(),
                  " needs ", name);
    }
    for (const auto& [key, value] : kwargs) {
      const auto found = planned.by_name.find(py::str(key));
      TORCH_CHECK(found != planned.by_name.end(), "StepPlan: ", planned.op.schema().name(),
                  " has no argument ", std::string(py::str(key)));
      TORCH_CHECK(planned.lists[found->second.first].empty(), "StepPlan: ",
                  std::string(py::str(key)), " is a tensor list of the plan");
      stack[found->second.first] = torch::jit::toIValue(value, found->second.second);
    }
    {
      // The plan keeps its references to every tensor of the call, so nothing the call drops
      // reaches a Python object while the GIL is released.
      py::gil_scoped_release no_gil;
      planned.invoke(planned, stack);
    }
  }

  // Drops the plan's references to the grads, so that `zero_grad()` frees them as before.
  void release_grads() {
    grads_.clear();
    for (PlannedCall& call : calls_) call.lists[call.grads_index].clear();
  }

 private:
  // A grad is three hops from the plan: the param's TensorImpl, its autograd metadata, the
  // grad's TensorImpl, each a miss when the step comes cold (see kParamsAhead).
  void prefetch_grad_ahead(size_t i) const {
    const size_t n = params_.size();
    if (i + kParamsAhead < n) prefetch_tensor_impl(params_[i + kParamsAhead].param);
    if (i + kMetaAhead < n) {
      const c10::TensorImpl* param = params_[i + kMetaAhead].param.unsafeGetTensorImpl();
      if (const auto* meta = param->autograd_meta()) __builtin_prefetch(meta);
    }
    if (i + kGradsAhead < n) {
      const at::Tensor& grad = params_[i + kGradsAhead].param.unsafeGetTensorImpl()->grad();
      if (grad.defined()) prefetch_tensor_impl(grad);
    }
  }

  size_t index_of(const at::Tensor& p) {
    const auto found = index_.find(p.unsafeGetTensorImpl());
    if (found != index_.end()) return found->second;
    index_.emplace(p.unsafeGetTensorImpl(), params_.size());
    params_.emplace_back(p);
    return params_.size() - 1;
  }

  std::vector<at::Tensor> idle_;
  std::vector<std::pair<at::Tensor, int64_t>> versioned_;
  StateEntries state_;
  std::vector<PlannedParam> params_;
  std::unordered_map<const c10::TensorImpl*, size_t> index_;
  std::vector<at::Tensor> grads_;
  std::vector<PlannedCall> calls_;
};

}  // namespace fused_opt

// `import fused_opt._C` loads the library, which registers the ops (csrc/ops.cpp and the
// kernels' files), and gives the optimizers the step plan.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fused_opt::StepPlan;
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<const std::vector<at::Tensor>&,
                    const std::vector<std::pair<at::Tensor, int64_t>>&, const py::dict&>(),
           py::arg("idle"), py::arg("versioned"), py::arg("state"))
      .def("add_call", &StepPlan::add_call, py::arg("op_name"), py::arg("params"),
           py::arg("args"), py::arg("kwargs"))
      .def("gather_grads", &StepPlan::gather_grads)
      .def("call", &StepPlan::call, py::arg("index"), py::arg("kwargs"))
      .def("release_grads", &StepPlan::release_grads);
}
