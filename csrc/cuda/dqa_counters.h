// Which slot of arrival counters a backward launch uses for its fused finalize (dqa_walk.h's
// reduction). The counters live in device memory that starts zeroed and that every launch
// leaves zeroed (the block that arrives last at a counter resets it), so no memset runs
// between calls and a CUDA graph can replay the launch. Two launches that may run at the same
// time must not share a slot: launches on one stream are ordered, so eager launches get one
// slot per (device, stream); launches captured into a graph get one per (device, stream,
// capture), so that two graphs, or a graph and eager work, may run side by side. A capture's
// slot is given back when its graph and every executable made from it are destroyed (the
// launcher ties it to the graph with a CUDA user object); an eager stream keeps its slot. When
// every slot is taken the launcher runs the separate finalize instead, which sums in the same
// order: dstep is the same either way. Plain C++ (g++ unit-tests it, tests/plan_test.cpp).
#pragma once

#include <cstdint>

namespace dqa_cuda {

constexpr int kCounterSlots = 64;  // per device; each holds kMaxCounters (dqa_plan.h) counters

struct SlotGrant {
  int slot;    // -1 when all kCounterSlots are taken
  bool fresh;  // first grant to this key: a capture must tie the slot to its graph now
};

// The slot for launches on `stream` (an opaque handle) of `device`, inside the capture
// `capture_id` (0 when not capturing). Thread-safe.
SlotGrant counter_slot(int device, uintptr_t stream, unsigned long long capture_id);

// The capture that held `slot` of `device` is over and its graph gone: the slot may be given
// again (its counters are zero: every launch that used them has completed). Thread-safe; makes
// no CUDA call (it runs in a CUDA user object's destructor).
void release_slot(int device, int slot);

}  // namespace dqa_cuda
