// Which slot of arrival counters a backward launch uses for its fused finalize (dqa_walk.h's
// reduction). The counters live in device memory that starts zeroed and that every launch
// leaves zeroed (the block that arrives last at a counter resets it), so no memset runs
// between calls and a CUDA graph can replay the launch. Two launches that may run at the same
// time must not share a slot: launches on one stream are ordered, so eager launches get one
// slot per (device, stream); a launch captured into a graph gets one per (device, stream,
// capture), so that two graphs, or a graph and eager work, may run side by side. When every
// slot is taken the launcher runs the separate finalize instead, which sums in the same order:
// dstep is the same either way. Plain C++ (g++ unit-tests it, csrc/cuda/tests/plan_test.cpp).
#pragma once

#include <cstdint>

namespace dqa_cuda {

constexpr int kCounterSlots = 64;  // per device; each holds kMaxCounters (dqa_plan.h) counters

// The slot for launches on `stream` (an opaque handle) of `device`, inside the capture
// `capture_id` (0 when not capturing); -1 when all kCounterSlots are taken. Thread-safe.
int counter_slot(int device, uintptr_t stream, unsigned long long capture_id);

}  // namespace dqa_cuda
