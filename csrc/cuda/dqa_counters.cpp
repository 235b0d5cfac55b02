// Counter slots of the fused finalize (see dqa_counters.h). Plain C++: g++ compiles it alone.
#include "dqa_counters.h"

#include <mutex>
#include <vector>

namespace dqa_cuda {
namespace {

struct Key {
  uintptr_t stream;
  unsigned long long capture_id;
  bool used;
};

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}

// Per device, the keys holding each slot (index = slot).
std::vector<std::vector<Key>>& table() {
  static std::vector<std::vector<Key>> t;
  return t;
}

}  // namespace

SlotGrant counter_slot(int device, uintptr_t stream, unsigned long long capture_id) {
  if (device < 0) return {-1, false};
  const std::lock_guard<std::mutex> lock(table_mutex());
  auto& t = table();
  if (static_cast<size_t>(device) >= t.size()) t.resize(static_cast<size_t>(device) + 1);
  std::vector<Key>& slots = t[static_cast<size_t>(device)];
  int free_slot = -1;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i].used && slots[i].stream == stream && slots[i].capture_id == capture_id) {
      return {static_cast<int>(i), false};
    }
    if (!slots[i].used && free_slot < 0) free_slot = static_cast<int>(i);
  }
  if (free_slot < 0) {
    if (slots.size() >= static_cast<size_t>(kCounterSlots)) return {-1, false};
    slots.push_back({});
    free_slot = static_cast<int>(slots.size()) - 1;
  }
  slots[static_cast<size_t>(free_slot)] = {stream, capture_id, true};
  return {free_slot, true};
}

void release_slot(int device, int slot) {
  const std::lock_guard<std::mutex> lock(table_mutex());
  auto& t = table();
  if (device < 0 || static_cast<size_t>(device) >= t.size()) return;
  std::vector<Key>& slots = t[static_cast<size_t>(device)];
  if (slot >= 0 && static_cast<size_t>(slot) < slots.size()) slots[static_cast<size_t>(slot)].used = false;
}

}  // namespace dqa_cuda
