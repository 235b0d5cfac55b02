// Counter slots of the fused finalize (see dqa_counters.h). Plain C++: g++ compiles it alone.
#include "dqa_counters.h"

#include <mutex>
#include <vector>

namespace dqa_cuda {
namespace {

struct Holder {
  SlotKey kind;
  unsigned long long id;
  uintptr_t stream;
  unsigned long long token;  // 0: the slot is free
};

// Per device, the holder of each slot (index = slot). Never destroyed: a CUDA user object's
// destructor may call release_slot on CUDA's thread while static destructors run at exit.
struct Table {
  std::mutex mutex;
  std::vector<std::vector<Holder>> devices;
  unsigned long long next_token = 1;
};
Table& table() {
  static Table* t = new Table;
  return *t;
}

}  // namespace

SlotGrant counter_slot(int device, SlotKey kind, unsigned long long id, uintptr_t stream) {
  if (device < 0) return {-1, false, 0};
  Table& t = table();
  const std::lock_guard<std::mutex> lock(t.mutex);
  if (static_cast<size_t>(device) >= t.devices.size()) t.devices.resize(static_cast<size_t>(device) + 1);
  std::vector<Holder>& slots = t.devices[static_cast<size_t>(device)];
  int free_slot = -1;
  int eager = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    const Holder& h = slots[i];
    if (h.token == 0) {
      if (free_slot < 0) free_slot = static_cast<int>(i);
      continue;
    }
    if (h.kind == kind && h.id == id && h.stream == stream) return {static_cast<int>(i), false, h.token};
    eager += h.kind == SlotKey::kEager;
  }
  if (kind == SlotKey::kEager && eager >= kEagerSlots) return {-1, false, 0};
  if (free_slot < 0) {
    if (slots.size() >= static_cast<size_t>(kCounterSlots)) return {-1, false, 0};
    slots.push_back({});
    free_slot = static_cast<int>(slots.size()) - 1;
  }
  const unsigned long long token = t.next_token++;
  slots[static_cast<size_t>(free_slot)] = {kind, id, stream, token};
  return {free_slot, true, token};
}

void release_slot(int device, int slot, unsigned long long token) {
  Table& t = table();
  const std::lock_guard<std::mutex> lock(t.mutex);
  if (device < 0 || static_cast<size_t>(device) >= t.devices.size() || token == 0) return;
  std::vector<Holder>& slots = t.devices[static_cast<size_t>(device)];
  if (slot < 0 || static_cast<size_t>(slot) >= slots.size()) return;
  Holder& h = slots[static_cast<size_t>(slot)];
  if (h.token == token) h.token = 0;
}

}  // namespace dqa_cuda
