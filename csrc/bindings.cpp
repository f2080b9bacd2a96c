// pybind11 module lowbit._C. Tensors arrive as raw pointers (ints) with shapes and strides:
// the extension never includes or links torch, so one wheel serves every torch version.
// Python (lowbit/_backend.py) checks dtypes/devices/contiguity first; this layer re-checks
// what a bad pointer or shape would turn into a crash, then releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "dispatch.h"
#include "formats.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace lowbit;

namespace {

template <typename T>
const T* ptr(uint64_t p) { return reinterpret_cast<const T*>(static_cast<uintptr_t>(p)); }

DType to_dtype(int d) {
  if (d < 0 || d >= kNumDTypes) throw std::invalid_argument("unknown dtype id " + std::to_string(d));
  return DType(d);
}

QWeight make_weight(int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
                    uint64_t data, int64_t ld_data, uint64_t scales, uint64_t zeros,
                    uint64_t dq_scale, uint64_t dq_offset, bool float_offset) {
  if (fmt < 0 || fmt >= kNumFormats) throw std::invalid_argument("unknown format id " + std::to_string(fmt));
  QWeight w{};
  w.fmt = Format(fmt);
  w.N = N;
  w.K = K;
  w.group = group;
  w.n_groups = group > 0 ? (K + group - 1) / group : 0;
  w.symmetric = symmetric;
  w.double_quant = double_quant;
  w.float_offset = float_offset;
  w.data = ptr<uint8_t>(data);
  w.ld_data = ld_data;
  w.scales = ptr<void>(scales);
  w.zeros = ptr<void>(zeros);
  w.dq_scale = ptr<float>(dq_scale);
  w.dq_offset = ptr<float>(dq_offset);
  w.dq_chunks = (w.n_groups + kNF4DoubleQuantChunk - 1) / kNF4DoubleQuantChunk;
  if (double_quant && (reinterpret_cast<uintptr_t>(w.dq_scale) % 4 || reinterpret_cast<uintptr_t>(w.dq_offset) % 4))
    throw std::invalid_argument("double-quant tensors must be 4-byte aligned float32");
  if (!double_quant && reinterpret_cast<uintptr_t>(w.scales) % 4)
    throw std::invalid_argument("scales must be 4-byte aligned float32");
  if (fmt == kInt8) {
    // the C++ side tells int8's variants by the zeros pointer (kernel_api.h): keep them in step
    if (symmetric && zeros) throw std::invalid_argument("symmetric int8 must not carry zeros");
    if (!symmetric && !zeros) throw std::invalid_argument("asymmetric int8 needs a zeros tensor (int16)");
    if (zeros % 2) throw std::invalid_argument("int8 zeros must be 2-byte aligned int16");
  }
  if (float_offset && zeros % 4) throw std::invalid_argument("int4 float offsets must be 4-byte aligned float32");
  validate(w);
  return w;
}

const KernelTable* table_arg(const std::string& isa) {
  return isa.empty() ? nullptr : &table_for(isa);
}

// The table a bound handle keeps: the named one, or the one active when it is bound.
const KernelTable* bound_table(const std::string& isa) {
  return &(isa.empty() ? active_table() : table_for(isa));
}

// Shape and format only (no tensors): what the fast path's packed_size / linear_packed need.
QWeight make_meta(int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
                  bool float_offset) {
  if (fmt < 0 || fmt >= kNumFormats) throw std::invalid_argument("unknown format id " + std::to_string(fmt));
  QWeight w{};
  w.fmt = Format(fmt);
  w.N = N;
  w.K = K;
  w.group = group;
  w.n_groups = group > 0 ? (K + group - 1) / group : 0;
  w.symmetric = symmetric;
  w.double_quant = double_quant;
  w.float_offset = float_offset;
  // int8's asymmetric variant is told by its zeros pointer (kernel_api.h); a meta weight's
  // tensors are never read, so a dummy marks it (the fast path then reports no support).
  static const int16_t kMetaZero = 0;
  if (fmt == kInt8 && !symmetric) w.zeros = &kMetaZero;
  w.ld_data = fmt == kInt8 ? K : (K + 1) / 2;
  w.dq_chunks = (w.n_groups + kNF4DoubleQuantChunk - 1) / kNF4DoubleQuantChunk;
  validate_shape(w);
  return w;
}

LinearArgs make_args(const QWeight& w, uint64_t x, int x_dtype, int64_t M, int64_t ldx, uint64_t bias,
                     uint64_t y, int y_dtype, int64_t ldy, int n_threads) {
  LinearArgs a{};
  a.w = w;
  a.x = ptr<void>(x);
  a.x_dtype = to_dtype(x_dtype);
  a.M = M;
  a.ldx = ldx;
  a.bias = ptr<float>(bias);
  a.y = reinterpret_cast<void*>(static_cast<uintptr_t>(y));
  a.y_dtype = to_dtype(y_dtype);
  a.ldy = ldy;
  a.n_threads = n_threads;
  return a;
}

// Runs fn `repeat` times; returns the seconds per run (for benchmarks: the kernel's own time
// without Python in between).
template <class Fn>
double timed(int64_t repeat, const Fn& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < std::max<int64_t>(1, repeat); ++i) fn();
  const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
  return dt.count() / double(std::max<int64_t>(1, repeat));
}

// The weights bound once for the per-call Python path (lowbit._backend): PackedLinear for the
// fast path (a packed blob the caller keeps alive), ExactLinear for the exact path (the weight's
// own tensors, which the caller keeps alive at the same addresses).
struct PackedLinear {
  QWeight w;
  const KernelTable* table;
  const uint8_t* packed;
  int64_t bytes;
};
struct ExactLinear {
  QWeight w;
  const KernelTable* table;
};

void run_bound(const PackedLinear& h, const LinearArgs& a) {
  py::gil_scoped_release nogil;
  lowbit::linear_packed(a, h.packed, h.bytes, h.table);
}
void run_bound(const ExactLinear& h, const LinearArgs& a) {
  py::gil_scoped_release nogil;
  lowbit::linear(a, h.table);
}

// lowbit._C.call(handle, x, x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads): a bound handle's
// call through CPython's vectorcall protocol with the integers read directly. A pybind11 call with
// nine integer arguments costs ~0.9 us of conversion and overload dispatch, this ~0.2 us: on a
// decoding step's small layers (576 x 576 at M = 1, a ~7 us kernel) that is a tenth of the call.
// call_active (the same function with self = True) runs the handle only when it is bound to the
// active ISA's kernels and returns whether it ran (lowbit.set_isa may have changed the ISA since the
// handle was cached for it).
PyObject* call_bound(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  const bool active_only = self == Py_True;
  if (nargs != 10) {
    PyErr_Format(PyExc_TypeError, "call(handle, x, x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads) takes 10 "
                 "arguments, got %zd", nargs);
    return nullptr;
  }
  uint64_t u[9];
  for (int i = 0; i < 9; ++i) {
    PyObject* o = args[i + 1];
    if (!PyLong_Check(o)) {
      PyErr_Format(PyExc_TypeError, "call: argument %d must be an int, got %s", i + 1, Py_TYPE(o)->tp_name);
      return nullptr;
    }
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
      // (pointers above 2^63 do not occur in user space on the platforms lowbit builds for)
      return nullptr;
    }
    u[i] = static_cast<uint64_t>(v);
  }
  const auto i64 = [&](int i) { return static_cast<int64_t>(u[i]); };
  const auto i32 = [&](int i) -> int {
    if (i64(i) < INT32_MIN || i64(i) > INT32_MAX) throw std::invalid_argument("argument out of range");
    return static_cast<int>(i64(i));
  };
  // runs a handle of either type; false: declined (active_only and another ISA's handle)
  const auto run = [&](const auto& b) {
    if (active_only && b.table != &active_table()) return false;
    run_bound(b, make_args(b.w, u[0], i32(1), i64(2), i64(3), u[4], u[5], i32(6), i64(7), i32(8)));
    return true;
  };
  bool ran = false;
  try {
    const py::handle h(args[0]);
    if (py::isinstance<PackedLinear>(h)) {
      ran = run(h.cast<const PackedLinear&>());
    } else if (py::isinstance<ExactLinear>(h)) {
      ran = run(h.cast<const ExactLinear&>());
    } else {
      PyErr_Format(PyExc_TypeError, "call: handle must be a PackedLinear or ExactLinear, got %s",
                   Py_TYPE(args[0])->tp_name);
      return nullptr;
    }
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (const std::bad_alloc&) {  // (the Python exceptions pybind11 raises for these)
    PyErr_NoMemory();
    return nullptr;
  } catch (const std::out_of_range& e) {
    PyErr_SetString(PyExc_IndexError, e.what());
    return nullptr;
  } catch (const std::overflow_error& e) {
    PyErr_SetString(PyExc_OverflowError, e.what());
    return nullptr;
  } catch (const std::logic_error& e) {  // invalid_argument, domain_error, length_error
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  } catch (const std::range_error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (!active_only) Py_RETURN_NONE;
  return PyBool_FromLong(ran);
}

PyMethodDef call_bound_def = {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(call_bound)),
                              METH_FASTCALL, "A bound PackedLinear / ExactLinear handle's __call__, faster."};
PyMethodDef call_active_def = {
    "call_active", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(call_bound)), METH_FASTCALL,
    "call() if the handle is bound to the active ISA (returns True), else nothing (returns False)."};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (plain C++ behind a pointer-passing binding)";

  m.def(
      "linear",
      [](int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
         uint64_t data, int64_t ld_data, uint64_t scales, uint64_t zeros, uint64_t dq_scale,
         uint64_t dq_offset, uint64_t x, int x_dtype, int64_t M, int64_t ldx, uint64_t bias,
         uint64_t y, int y_dtype, int64_t ldy, int n_threads, const std::string& isa,
         int64_t repeat, bool float_offset) {
        const LinearArgs a = make_args(make_weight(fmt, N, K, group, symmetric, double_quant, data,
                                                   ld_data, scales, zeros, dq_scale, dq_offset,
                                                   float_offset),
                                       x, x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads);
        const KernelTable* t = table_arg(isa);
        py::gil_scoped_release nogil;
        return timed(repeat, [&] { lowbit::linear(a, t); });
      },
      py::arg("fmt"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("symmetric"),
      py::arg("double_quant"), py::arg("data"), py::arg("ld_data"), py::arg("scales"),
      py::arg("zeros"), py::arg("dq_scale"), py::arg("dq_offset"), py::arg("x"),
      py::arg("x_dtype"), py::arg("M"), py::arg("ldx"), py::arg("bias"), py::arg("y"),
      py::arg("y_dtype"), py::arg("ldy"), py::arg("n_threads"), py::arg("isa") = "",
      py::arg("repeat") = 1, py::arg("float_offset") = false,
      "The exact path: y = x @ W^T + bias. Returns the seconds per run (repeat runs). "
      "float_offset: int4's float-offset variant (zeros = float32 offsets).");

  // ---- the activation-quantized fast path ----
  m.def(
      "packed_size",
      [](int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
         const std::string& isa, bool float_offset) {
        return lowbit::packed_size(make_meta(fmt, N, K, group, symmetric, double_quant, float_offset),
                                   table_arg(isa));
      },
      py::arg("fmt"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("symmetric"),
      py::arg("double_quant"), py::arg("isa") = "", py::arg("float_offset") = false,
      "Bytes of the packed form for the fast path (header included); 0: not supported.");
  m.def(
      "pack",
      [](int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
         uint64_t data, int64_t ld_data, uint64_t scales, uint64_t zeros, uint64_t dq_scale,
         uint64_t dq_offset, uint64_t dst, int64_t dst_bytes, int n_threads, const std::string& isa,
         bool float_offset) {
        QWeight w = make_weight(fmt, N, K, group, symmetric, double_quant, data, ld_data, scales,
                                zeros, dq_scale, dq_offset, float_offset);
        const KernelTable* t = table_arg(isa);
        uint8_t* d = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(dst));
        py::gil_scoped_release nogil;
        lowbit::pack_weight(w, d, dst_bytes, n_threads, t);
      },
      py::arg("fmt"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("symmetric"),
      py::arg("double_quant"), py::arg("data"), py::arg("ld_data"), py::arg("scales"),
      py::arg("zeros"), py::arg("dq_scale"), py::arg("dq_offset"), py::arg("dst"),
      py::arg("dst_bytes"), py::arg("n_threads"), py::arg("isa") = "", py::arg("float_offset") = false);
  m.def(
      "linear_packed",
      [](uint64_t packed, int64_t packed_bytes, int fmt, int64_t N, int64_t K, int64_t group,
         bool symmetric, bool double_quant, uint64_t x, int x_dtype, int64_t M, int64_t ldx,
         uint64_t bias, uint64_t y, int y_dtype, int64_t ldy, int n_threads, const std::string& isa,
         int64_t repeat, bool float_offset) {
        const LinearArgs a = make_args(make_meta(fmt, N, K, group, symmetric, double_quant, float_offset), x,
                                       x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads);
        const KernelTable* t = table_arg(isa);
        const uint8_t* p = ptr<uint8_t>(packed);
        py::gil_scoped_release nogil;
        return timed(repeat, [&] { lowbit::linear_packed(a, p, packed_bytes, t); });
      },
      py::arg("packed"), py::arg("packed_bytes"), py::arg("fmt"), py::arg("N"), py::arg("K"),
      py::arg("group"), py::arg("symmetric"), py::arg("double_quant"), py::arg("x"),
      py::arg("x_dtype"), py::arg("M"), py::arg("ldx"), py::arg("bias"), py::arg("y"),
      py::arg("y_dtype"), py::arg("ldy"), py::arg("n_threads"), py::arg("isa") = "",
      py::arg("repeat") = 1, py::arg("float_offset") = false,
      "The fast path on a packed weight. Returns the seconds per run (repeat runs).");
  // A packed weight bound once (the per-call Python path, lowbit._backend.linear): the
  // weight's meta and ISA table are resolved at construction, so a call converts 9 arguments.
  // The blob's header is still checked on every call (linear_packed), and the caller keeps the
  // blob alive as long as the handle (lowbit._backend._Blob holds both).
  py::class_<PackedLinear>(m, "PackedLinear")
      .def(py::init([](uint64_t packed, int64_t packed_bytes, int fmt, int64_t N, int64_t K, int64_t group,
                       bool symmetric, bool double_quant, const std::string& isa, bool float_offset) {
             if (!packed) throw std::invalid_argument("null packed weight");
             return PackedLinear{make_meta(fmt, N, K, group, symmetric, double_quant, float_offset),
                                 bound_table(isa), ptr<uint8_t>(packed), packed_bytes};
           }),
           py::arg("packed"), py::arg("packed_bytes"), py::arg("fmt"), py::arg("N"), py::arg("K"),
           py::arg("group"), py::arg("symmetric"), py::arg("double_quant"), py::arg("isa"),
           py::arg("float_offset") = false)
      .def(
          "__call__",
          [](const PackedLinear& h, uint64_t x, int x_dtype, int64_t M, int64_t ldx, uint64_t bias, uint64_t y,
             int y_dtype, int64_t ldy, int n_threads) {
            run_bound(h, make_args(h.w, x, x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads));
          },
          py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("ldx"), py::arg("bias"), py::arg("y"),
          py::arg("y_dtype"), py::arg("ldy"), py::arg("n_threads"),
          "linear_packed on the bound weight: y = x @ W^T + bias.");
  // The exact path's weight bound once (the per-call Python path, lowbit._backend.linear_rows):
  // the weight's pointers, meta and ISA table are resolved at construction, so a call converts
  // 9 arguments instead of 24 (a call on a tiny weight: 15.5 -> 5-6 us, Emerald Rapids). The caller
  // keeps the weight's tensors alive and unchanged in place of storage as long as the handle
  // (lowbit._backend._Exact checks them before each use).
  py::class_<ExactLinear>(m, "ExactLinear")
      .def(py::init([](int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
                       uint64_t data, int64_t ld_data, uint64_t scales, uint64_t zeros, uint64_t dq_scale,
                       uint64_t dq_offset, const std::string& isa, bool float_offset) {
             ExactLinear h{make_weight(fmt, N, K, group, symmetric, double_quant, data, ld_data, scales, zeros,
                                       dq_scale, dq_offset, float_offset),
                           bound_table(isa)};
             lowbit::validate(h.w);
             return h;
           }),
           py::arg("fmt"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("symmetric"),
           py::arg("double_quant"), py::arg("data"), py::arg("ld_data"), py::arg("scales"), py::arg("zeros"),
           py::arg("dq_scale"), py::arg("dq_offset"), py::arg("isa"), py::arg("float_offset") = false)
      .def(
          "__call__",
          [](const ExactLinear& h, uint64_t x, int x_dtype, int64_t M, int64_t ldx, uint64_t bias, uint64_t y,
             int y_dtype, int64_t ldy, int n_threads) {
            run_bound(h, make_args(h.w, x, x_dtype, M, ldx, bias, y, y_dtype, ldy, n_threads));
          },
          py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("ldx"), py::arg("bias"), py::arg("y"),
          py::arg("y_dtype"), py::arg("ldy"), py::arg("n_threads"),
          "linear (the exact path) on the bound weight: y = x @ W^T + bias.");
  m.add_object("call", py::reinterpret_steal<py::object>(
                           PyCFunction_NewEx(&call_bound_def, nullptr, m.attr("__name__").ptr())));
  m.add_object("call_active", py::reinterpret_steal<py::object>(
                                  PyCFunction_NewEx(&call_active_def, Py_True, m.attr("__name__").ptr())));
  m.def(
      "codebook_codes",
      [](uint64_t w, int64_t N, int64_t K, int64_t ldw, int64_t block, uint64_t absmax, uint64_t table,
         uint64_t out, int64_t ldo, int n_threads) {
        py::gil_scoped_release nogil;
        lowbit::codebook_codes(ptr<float>(w), N, K, ldw, block, ptr<float>(absmax), ptr<float>(table),
                               reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(out)), ldo, n_threads);
      },
      py::arg("w"), py::arg("N"), py::arg("K"), py::arg("ldw"), py::arg("block"), py::arg("absmax"),
      py::arg("table"), py::arg("out"), py::arg("ldo"), py::arg("n_threads"),
      "The packed codes of codebook quantization (lowbit.reference.quantize_codebook's search).");
  m.def(
      "quantize_activations",
      [](uint64_t x, int x_dtype, int64_t M, int64_t K, int64_t ldx, int64_t block, uint64_t q,
         uint64_t d, uint64_t sum, const std::string& isa) {
        const KernelTable& t = isa.empty() ? active_table() : table_for(isa);
        if (M < 0 || K <= 0 || ldx < K) throw std::invalid_argument("bad activation shape");
        if (block != 8 && block != 16) throw std::invalid_argument("block must be 8 or 16");
        const DType dt = to_dtype(x_dtype);
        const char* xs = ptr<char>(x);
        int8_t* qp = reinterpret_cast<int8_t*>(static_cast<uintptr_t>(q));
        float* dp = reinterpret_cast<float*>(static_cast<uintptr_t>(d));
        int32_t* sp = reinterpret_cast<int32_t*>(static_cast<uintptr_t>(sum));
        const int64_t ldq = (K + kQChunk - 1) / kQChunk * kQChunk, nb = ldq / block;
        const size_t es = dt == kF32 ? 4 : 2;
        py::gil_scoped_release nogil;
        std::vector<float> row(static_cast<size_t>(K));
        for (int64_t m = 0; m < M; ++m) {
          t.to_f32[dt](xs + size_t(m * ldx) * es, row.data(), K);
          t.quantize_row(row.data(), K, block, qp + m * ldq, dp + m * nb, sp + m * nb);
        }
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("block"),
      py::arg("q"), py::arg("d"), py::arg("sum"), py::arg("isa") = "",
      "The fast path's activation quantizer (for tests): q int8 [M, ldq], d float32 [M, nb], "
      "sum int32 [M, nb] with ldq = ceil(K / 32) * 32 and nb = ldq / block (8 or 16).");
  m.def(
      "has_fast_path",
      [](const std::string& fmt, const std::string& isa) {
        const KernelTable& t = isa.empty() ? active_table() : table_for(isa);
        for (int i = 0; i < kNumFormats; ++i)
          if (fmt == kFormatTraits[i].name) return t.packed_size[i] != nullptr;
        throw std::invalid_argument("unknown format '" + fmt + "'");
      },
      py::arg("fmt"), py::arg("isa") = "",
      "Whether the ISA's table has an activation-quantized fast path for the format (whether a "
      "given weight is supported: packed_size(...) > 0).");
  {
    py::dict qb;  // activation block of the fast path per format name
    for (int i = 0; i < kNumFormats; ++i) qb[kFormatTraits[i].name] = kQBlockOf[i];
    m.attr("QBLOCK") = qb;
  }
  m.attr("QCHUNK") = kQChunk;
  m.def(
      "codebook_i16",
      [](const std::string& fmt) {
        for (int i = 0; i < kNumFormats; ++i)
          if (fmt == kFormatTraits[i].name) {
            if (!kIsCodebook[i]) throw std::invalid_argument("'" + fmt + "' is not a codebook format");
            py::list l;
            for (int16_t v : kCodebookI16[i]) l.append(int(v));
            return l;
          }
        throw std::invalid_argument("unknown format '" + fmt + "'");
      },
      py::arg("fmt"),
      "The fast path's 16 integer codes of a codebook format (nf4, fp4), in code order: "
      "round(CODE_SCALE * codebook), csrc/formats.h kCodebookI16.");
  {
    py::dict cs;  // integer code scale per codebook format
    for (int i = 0; i < kNumFormats; ++i)
      if (kIsCodebook[i]) cs[kFormatTraits[i].name] = kCodeScale[i];
    m.attr("CODE_SCALE") = cs;
  }

  m.def(
      "dequantize",
      [](int fmt, int64_t N, int64_t K, int64_t group, bool symmetric, bool double_quant,
         uint64_t data, int64_t ld_data, uint64_t scales, uint64_t zeros, uint64_t dq_scale,
         uint64_t dq_offset, uint64_t out, int out_dtype, int64_t ldo, int n_threads,
         const std::string& isa, bool float_offset) {
        QWeight w = make_weight(fmt, N, K, group, symmetric, double_quant, data, ld_data, scales,
                                zeros, dq_scale, dq_offset, float_offset);
        const DType dt = to_dtype(out_dtype);
        const KernelTable* t = table_arg(isa);
        void* o = reinterpret_cast<void*>(static_cast<uintptr_t>(out));
        py::gil_scoped_release nogil;
        lowbit::dequantize(w, o, dt, ldo, n_threads, t);
      },
      py::arg("fmt"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("symmetric"),
      py::arg("double_quant"), py::arg("data"), py::arg("ld_data"), py::arg("scales"),
      py::arg("zeros"), py::arg("dq_scale"), py::arg("dq_offset"), py::arg("out"),
      py::arg("out_dtype"), py::arg("ldo"), py::arg("n_threads"), py::arg("isa") = "",
      py::arg("float_offset") = false);

  m.def("set_isa", [](const std::string& isa) { set_active_isa(isa); });
  m.def("active_isa", [] { return std::string(active_table().isa); });
  m.def("active_reason", [] { return active_reason(); });
  m.def("compiled_isas", [] { return compiled_isas(); });
  m.def("supported_isas", [] { return supported_isas(); });
  // From this many activation rows the fast path of `isa` ("" = active) multiplies weights of
  // format `fmt` with tiles (kernel_api.h, "tile path"; more accurate than the quantized
  // activations); 0: never.
  m.def("tile_min_m", [](const std::string& isa, const std::string& fmt) {
    for (int f = 0; f < kNumFormats; ++f)
      if (fmt == kFormatTraits[f].name)
        return (isa.empty() ? active_table() : table_for(isa)).tile_min_m[f];
    throw std::invalid_argument("unknown format '" + fmt + "'");
  }, py::arg("isa") = "", py::arg("fmt") = "int8");
  m.def("pool_size", [] { return pool_size(); });
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq; d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
    d["avx_vnni"] = f.avx_vnni;
    d["amx_bf16"] = f.amx_bf16; d["neon"] = f.neon; d["dotprod"] = f.dotprod;
    return d;
  });
  m.def("format_traits", [] {
    py::list out;
    for (int i = 0; i < kNumFormats; ++i) {
      const FormatTraits& t = kFormatTraits[i];
      py::dict d;
      d["id"] = i; d["name"] = t.name; d["bits"] = t.bits; d["default_group"] = t.default_group;
      d["packed_nibbles"] = t.packed_nibbles; d["has_zero_point"] = t.has_zero_point;
      d["has_float_offset"] = t.has_float_offset;
      d["has_codebook"] = t.codebook != nullptr;
      py::list cb;
      if (t.codebook)
        for (int j = 0; j < 16; ++j) cb.append(t.codebook[j]);
      d["codebook"] = cb;
      out.append(d);
    }
    return out;
  });
  m.def("codebook", [](const std::string& fmt) {
    for (int i = 0; i < kNumFormats; ++i)
      if (fmt == kFormatTraits[i].name) {
        py::list l;
        if (kFormatTraits[i].codebook)
          for (int j = 0; j < 16; ++j) l.append(kFormatTraits[i].codebook[j]);
        return l;
      }
    throw std::invalid_argument("unknown format '" + fmt + "'");
  }, py::arg("fmt"), "The 16 codebook values of a codebook format (empty list for the others).");
  m.def("nf4_codebook", [] {
    py::list l;
    for (float v : kNF4Codebook) l.append(v);
    return l;
  });
  m.attr("NF4_DOUBLE_QUANT_CHUNK") = kNF4DoubleQuantChunk;
}
