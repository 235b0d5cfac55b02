// Which slot of arrival counters a backward launch uses for its fused finalize (dqa_walk.h's
// fused_finalize). The counters live in device memory that starts zeroed and that every launch
// leaves zeroed (the last arrival of each full set wraps its counter back to zero), so no
// memset runs between calls and a CUDA graph can replay the launch. Two launches that may run
// at the same time must not share a slot, so a slot belongs to one key:
//  - eager launches: the stream's unique id (cudaStreamGetId, unique for the life of the
//    process: a destroyed stream's handle reused by a new stream, or cudaStreamPerThread in two
//    threads, are different keys). Launches on one stream are ordered. An eager key keeps its
//    slot (its stream may still have work pending when the launcher could give it away), and at
//    most kEagerSlots slots go to eager keys, so that captures always find slots;
//  - launches captured into a graph: the (capture id, stream) pair, so that two graphs, a graph
//    and eager work, or two streams of one capture may run side by side. The slot is given back
//    when the graph and every executable made from it are destroyed (the launcher ties it to the
//    graph with a CUDA user object), with the token of its grant: a stale release does nothing.
// Executables that share one capture's graph (instantiated twice, cloned, embedded twice as a
// child graph) share its slot; they also share every buffer the captured launches read and
// write, so they must not run concurrently anyway.
// When no slot is free the launcher runs the separate finalize, which sums in the same order:
// dstep has the same bits either way. Plain C++ (g++ unit-tests it, tests/plan_test.cpp).
#pragma once

#include <cstdint>

namespace dqa_cuda {

constexpr int kCounterSlots = 64;  // per device; each holds kMaxCounters (dqa_plan.h) counters
constexpr int kEagerSlots = 32;    // at most, per device, for eager keys

enum class SlotKey : int { kEager = 0, kCapture = 1 };

struct SlotGrant {
  int slot;               // -1 when none is free
  bool fresh;             // first grant to this key: a capture must tie the slot to its graph now
  unsigned long long token;  // this grant's, for release_slot (never 0)
};

// The slot for launches of `device` keyed by `kind` and `id`: eager, the stream's unique id;
// captured, the capture id and the stream (an opaque handle, 0 for eager keys). Thread-safe.
SlotGrant counter_slot(int device, SlotKey kind, unsigned long long id, uintptr_t stream);

// The grant `token` of `slot` of `device` is over (a capture's graph is gone, or the launcher
// could not tie it to the graph): the slot may be given again. Nothing happens when the slot
// has since been given to another grant. Thread-safe; makes no CUDA call (it runs in a CUDA
// user object's destructor, on CUDA's own thread, possibly while the process exits).
void release_slot(int device, int slot, unsigned long long token);

}  // namespace dqa_cuda
