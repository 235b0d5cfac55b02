// Counter slots of the fused finalize (see dqa_counters.h). Plain C++: g++ compiles it alone.
#include "dqa_counters.h"

#include <mutex>
#include <vector>

namespace dqa_cuda {
namespace {

struct Key {
  int device;
  uintptr_t stream;
  unsigned long long capture_id;
  bool operator==(const Key& o) const {
    return device == o.device && stream == o.stream && capture_id == o.capture_id;
  }
};

}  // namespace

int counter_slot(int device, uintptr_t stream, unsigned long long capture_id) {
  static std::mutex mutex;
  static std::vector<std::vector<Key>> taken;  // per device, in the order the slots were given
  if (device < 0) return -1;
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= taken.size()) taken.resize(static_cast<size_t>(device) + 1);
  std::vector<Key>& slots = taken[static_cast<size_t>(device)];
  const Key key{device, stream, capture_id};
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i] == key) return static_cast<int>(i);
  }
  if (slots.size() >= static_cast<size_t>(kCounterSlots)) return -1;
  slots.push_back(key);
  return static_cast<int>(slots.size()) - 1;
}

}  // namespace dqa_cuda
