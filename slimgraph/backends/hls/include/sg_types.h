// slimgraph HLS layer library: types and the requantization every layer ends with.
//
// Two builds of the same source:
//   -DSG_PLAIN_TYPES (the Makefile's csim target): plain C++ integer types and a std::deque
//     stand-in for hls::stream, so g++ alone compiles the design and its testbench.
//   without it (Vitis HLS): ap_int<N> / ap_uint<N> from <ap_int.h> and <hls_stream.h>.
// Values are raw integers; what they mean in reals (scale, zero point) lives in model.h.
#ifndef SG_TYPES_H
#define SG_TYPES_H

#include <stdint.h>

#ifdef SG_PLAIN_TYPES
#include <cstddef>
#include <deque>
#include <type_traits>

namespace sg {
template <int N> struct sint {
  typedef typename std::conditional<(N <= 8), int8_t,
          typename std::conditional<(N <= 16), int16_t,
          typename std::conditional<(N <= 32), int32_t, int64_t>::type>::type>::type type;
};
template <int N> struct uint {
  typedef typename std::conditional<(N <= 8), uint8_t,
          typename std::conditional<(N <= 16), uint16_t,
          typename std::conditional<(N <= 32), uint32_t, uint64_t>::type>::type>::type type;
};
}  // namespace sg

namespace hls {
// FIFO with the read/write/empty interface of Vitis's hls::stream. In the C simulation layers
// run one after another, so a FIFO holds a whole tensor; depth pragmas matter only in hardware.
template <class T> class stream {
 public:
  stream() {}
  explicit stream(const char *) {}
  void write(const T &value) { items_.push_back(value); }
  T read() {
    T value = items_.front();
    items_.pop_front();
    return value;
  }
  bool empty() const { return items_.empty(); }
  std::size_t size() const { return items_.size(); }

 private:
  std::deque<T> items_;
};
}  // namespace hls

#else
#include <ap_int.h>
#include <hls_stream.h>

namespace sg {
// Odd widths are ap_int / ap_uint. The standard widths are <stdint.h> types, the same bits in
// hardware: a const array of them is static data, where a const array of ap_int runs a
// constructor per element at start-up, and g++ compiling resnet-tiny's 36k int8 weights that way
// needed 7 GB, 13 minutes and an unlimited stack (a segfault in cc1plus without it).
template <int N> struct sint { typedef ap_int<N> type; };
template <int N> struct uint { typedef ap_uint<N> type; };
template <> struct sint<8> { typedef int8_t type; };
template <> struct sint<16> { typedef int16_t type; };
template <> struct sint<32> { typedef int32_t type; };
template <> struct sint<64> { typedef int64_t type; };
template <> struct uint<8> { typedef uint8_t type; };
template <> struct uint<16> { typedef uint16_t type; };
template <> struct uint<32> { typedef uint32_t type; };
template <> struct uint<64> { typedef uint64_t type; };
}  // namespace sg
#endif

namespace sg {
// Constant weight arrays: N bits wide in synthesis (a ROM of ap_int<N>); in any C simulation the
// standard type that holds N bits, the same values (weights fit N by construction). An array of
// 100k ap_int<9> runs 100k constructors at start-up and took g++ 220 s to compile.
#if defined(__SYNTHESIS__) && !defined(SG_PLAIN_TYPES)
template <int N> struct wstore { typedef typename sint<N>::type type; };
#else
template <int N> struct wstore {
  typedef typename sint<(N <= 8 ? 8 : N <= 16 ? 16 : N <= 32 ? 32 : 64)>::type type;
};
#endif
}  // namespace sg

namespace sg {

// Requantization of one output channel: y = round_half_even(acc * m / 2^shift) + post.
struct rq_t {
  int32_t m;
  int32_t shift;
  int32_t post;
};

// acc / 2^shift, rounded to nearest with ties to even (onnxruntime rounds this way).
inline int64_t rounding_shift(int64_t value, int shift) {
  if (shift <= 0) return value;
  const int64_t floor = value >> shift;  // arithmetic shift: rounds toward minus infinity
  const int64_t remainder = value & ((int64_t(1) << shift) - 1);
  const int64_t half = int64_t(1) << (shift - 1);
  return floor + ((remainder > half || (remainder == half && (floor & 1))) ? 1 : 0);
}

template <class T_OUT>
inline T_OUT requantize(int64_t acc, const rq_t &rq, int64_t lo, int64_t hi) {
#pragma HLS INLINE
  int64_t value = rounding_shift(acc * int64_t(rq.m), rq.shift) + rq.post;
  if (value < lo) value = lo;
  if (value > hi) value = hi;
  return T_OUT(value);
}

}  // namespace sg

#endif
