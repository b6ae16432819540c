/*
 * Tensors' facts (address, size, dtype, device, layout, sizes, strides) read in C, a whole list per call.
 *
 * The optimizer keeps a param group's collection between steps behind a check that nothing it rests on
 * changed (adoptim/_plan.py). Read from Python, each fact of each tensor costs a method call of about
 * 100 ns; read here it costs a few. The reading goes through torch's stable C shim (the aoti_torch_*
 * functions that ahead-of-time compiled models call), whose addresses Python looks up in libtorch and
 * hands to adopt_facts_bind: this library stays free of any link to torch.
 *
 * A shim function takes an AtenTensorHandle, which is an at::Tensor*: a pointer to a cell holding the
 * TensorImpl*. A Python tensor object holds its at::Tensor at a fixed offset (torch's THPVariable: the
 * object header, then the at::Tensor), so where Python found that offset to hold what Tensor._cdata says
 * (facts.py checks it on several tensors before binding), the handle of a tensor is its object's
 * address (id()) plus the offset: reading id() costs Python far less than reading _cdata. Elsewhere
 * (obj_offset < 0) Python passes each tensor's TensorImpl* (Tensor._cdata) and the handle of tensor i
 * is the address of that cell. The caller keeps the tensors alive for the call. The impl of a Python
 * tensor object never changes, even when its .data is replaced (which replaces the impl's storage,
 * sizes and dtype in place): that is why the facts are read again at every step.
 *
 * Facts of one tensor: data address, numel, dtype, dim, then its sizes and strides (FACT_HEAD + 2 * dim
 * values). The address also tells the device (one virtual address space holds host and device memory)
 * and that the tensor is dense (a sparse one has none: the shim call fails).
 */
#include <stdbool.h>
#include <stdint.h>

#include "adopt_cpu.h"

#define FACT_HEAD 4
#define MAX_DIM 64

typedef int32_t (*ptr_fn)(void *, void **);
typedef int32_t (*i64_fn)(void *, int64_t *);
typedef int32_t (*i32_fn)(void *, int32_t *);
typedef int32_t (*arr_fn)(void *, int64_t **);
typedef int32_t (*bool_fn)(void *, bool *);

static struct {
    ptr_fn data_ptr;
    i64_fn numel, dim;
    i32_fn dtype, device_type, device_index, layout;
    arr_fn sizes, strides;
    bool_fn contiguous;
    int32_t strided;
    int64_t obj_offset; /* offset of the at::Tensor in a Python tensor object; < 0: cells of TensorImpl* */
    int bound;
} T;

/* The handle (at::Tensor*) of tensor i of a list given as objects' addresses or as TensorImpl* cells. */
static inline void *handle_of(const int64_t *tensors, int64_t i) {
    return T.obj_offset >= 0 ? (void *)(intptr_t)(tensors[i] + T.obj_offset) : (void *)&tensors[i];
}

/* fns: the addresses of aoti_torch_get_data_ptr, _get_numel, _get_dim, _get_dtype, _get_device_type,
 * _get_device_index, _get_layout, _get_sizes, _get_strides, _is_contiguous, in this order; strided: the
 * value of aoti_torch_layout_strided(); obj_offset: where a Python tensor object holds its at::Tensor,
 * or -1 (tensors are then given as TensorImpl* cells). Returns 0, or 1 when a handle is not a
 * pointer-sized cell. */
EXPORT int adopt_facts_bind(const int64_t *fns, int32_t strided, int64_t obj_offset) {
    if (sizeof(void *) != sizeof(int64_t)) return 1;
    T.data_ptr = (ptr_fn)(intptr_t)fns[0];
    T.numel = (i64_fn)(intptr_t)fns[1];
    T.dim = (i64_fn)(intptr_t)fns[2];
    T.dtype = (i32_fn)(intptr_t)fns[3];
    T.device_type = (i32_fn)(intptr_t)fns[4];
    T.device_index = (i32_fn)(intptr_t)fns[5];
    T.layout = (i32_fn)(intptr_t)fns[6];
    T.sizes = (arr_fn)(intptr_t)fns[7];
    T.strides = (arr_fn)(intptr_t)fns[8];
    T.contiguous = (bool_fn)(intptr_t)fns[9];
    T.strided = strided;
    T.obj_offset = obj_offset;
    T.bound = 1;
    return 0;
}

/* The facts of the tensor whose handle is h, into out (room for FACT_HEAD + 2 * MAX_DIM values).
 * Returns how many were written, or -1 when a shim call failed or the tensor has too many dimensions. */
static int64_t facts_of(void *h, int64_t *out) {
    void *data = 0;
    int32_t dtype = 0;
    int64_t numel = 0, dim = 0, *sizes = 0, *strides = 0;
    if (T.data_ptr(h, &data) || T.numel(h, &numel) || T.dim(h, &dim) || T.dtype(h, &dtype)) return -1;
    if (dim < 0 || dim > MAX_DIM || T.sizes(h, &sizes) || T.strides(h, &strides)) return -1;
    out[0] = (int64_t)(intptr_t)data;
    out[1] = numel;
    out[2] = dtype;
    out[3] = dim;
    for (int64_t d = 0; d < dim; d++) {
        out[FACT_HEAD + d] = sizes[d];
        out[FACT_HEAD + dim + d] = strides[d];
    }
    return FACT_HEAD + 2 * dim;
}

/* Writes the facts of n tensors (see handle_of) one after the other into out, which has room for cap
 * values. Returns the number written; -1 when the shim is not bound, a call failed or a tensor has no
 * data address or more than MAX_DIM dimensions; -2 when cap is too small. */
EXPORT int64_t adopt_facts_record(int64_t n, const int64_t *tensors, int64_t *out, int64_t cap) {
    if (!T.bound) return -1;
    int64_t len = 0, one[FACT_HEAD + 2 * MAX_DIM];
    for (int64_t i = 0; i < n; i++) {
        int64_t k = facts_of(handle_of(tensors, i), one);
        if (k < 0) return -1;
        if (len + k > cap) return -2;
        for (int64_t j = 0; j < k; j++) out[len + j] = one[j];
        len += k;
    }
    return len;
}

/* How many tensors ahead the check prefetches, and how many cache lines of each TensorImpl. */
#define PREFETCH_AHEAD 16
#define PREFETCH_LINES 4

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch((const void *)(address), 0, 3)
#else
#define PREFETCH(address) ((void)(address))
#endif

/* Hints to the CPU to start loading what the check reads of tensor i + PREFETCH_AHEAD (its TensorImpl)
 * and, given as objects, of tensor i + 2 * PREFETCH_AHEAD (the object's cell that points to it). A
 * collection's tensors are scattered over the heap and, between two steps, the step's own data evicts
 * them from the caches: loading them one after the other costs one memory latency per line, loading
 * several at once overlaps those latencies. Only addresses already in the cache are read here. */
static inline void prefetch_ahead(const int64_t *tensors, int64_t n, int64_t i) {
    const int64_t near = i + PREFETCH_AHEAD, far = i + 2 * PREFETCH_AHEAD;
    if (T.obj_offset >= 0 && far >= 0 && far < n) PREFETCH(tensors[far] + T.obj_offset);
    if (near >= 0 && near < n) {
        const char *impl = *(const char *const *)handle_of(tensors, near);
        for (int k = 0; k < PREFETCH_LINES; k++) PREFETCH(impl + 64 * k);
    }
}

/* Whether the gradient whose handle is gh is a dense contiguous tensor with the dtype, numel and device
 * of its parameter (handle ph, facts p: just read, so its TensorImpl is in the cache); its data address
 * into *data. */
static bool grad_fits(void *gh, void *ph, const int64_t *p, int64_t *data) {
    void *d = 0;
    int32_t dtype = 0, gdev = 0, pdev = 0, gidx = 0, pidx = 0, layout = 0;
    int64_t numel = 0;
    bool contiguous = false;
    if (T.layout(gh, &layout) || layout != T.strided || T.dtype(gh, &dtype) || dtype != p[2] ||
        T.numel(gh, &numel) || numel != p[1] || T.device_type(gh, &gdev) || T.device_type(ph, &pdev) ||
        gdev != pdev || T.device_index(gh, &gidx) || T.device_index(ph, &pidx) || gidx != pidx ||
        T.contiguous(gh, &contiguous) || !contiguous || T.data_ptr(gh, &d) || (numel && !d))
        return false;
    *data = (int64_t)(intptr_t)d;
    return true;
}

/* One step's check of a kept collection: whether the n_all tensors still have the facts recorded (len
 * values), and whether the n gradients are dense contiguous tensors on their parameter's device with
 * its dtype and number of elements (the parameters are the first n of the tensors);
 * then their data addresses are written to g_ptrs. Each gradient is checked beside its parameter, whose
 * facts were just read, so no TensorImpl is read twice.
 * Tensors and gradients are given as handle_of reads them.
 * Returns 0 when all holds; 1 + i when tensor i's facts changed (or a call failed); n_all + 1 + j when
 * gradient j is not such a tensor (the facts all hold: the caller checks gradients its own way). */
EXPORT int64_t adopt_facts_check(int64_t n_all, const int64_t *tensors, const int64_t *facts, int64_t len,
                                 int64_t n, const int64_t *grads, int64_t *g_ptrs) {
    if (!T.bound) return 1;
    int64_t at = 0, bad_grad = -1, one[FACT_HEAD + 2 * MAX_DIM];
    for (int64_t i = -2 * PREFETCH_AHEAD; i < 0; i++) { /* the first ones' */
        prefetch_ahead(tensors, n_all, i);
        prefetch_ahead(grads, n, i);
    }
    for (int64_t i = 0; i < n_all; i++) {
        prefetch_ahead(tensors, n_all, i);
        prefetch_ahead(grads, n, i);
        int64_t k = facts_of(handle_of(tensors, i), one);
        if (k < 0 || at + k > len) return 1 + i;
        for (int64_t j = 0; j < k; j++)
            if (one[j] != facts[at + j]) return 1 + i;
        at += k;
        if (i < n && bad_grad < 0 && !grad_fits(handle_of(grads, i), handle_of(tensors, i), one, &g_ptrs[i]))
            bad_grad = i;
    }
    if (at != len) return n_all > 0 ? n_all : 1;
    return bad_grad < 0 ? 0 : n_all + 1 + bad_grad;
}
