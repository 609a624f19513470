// slimgraph HLS layer library, io=parallel: each layer reads and writes whole arrays.
//
// Tensors are C-order arrays: [C][H][W] for feature maps, [N] for vectors. Every layer takes a
// config struct (generated in model.h) with its shapes, zero points, clamp bounds, accumulator
// type and reuse factor. The loop over output values is pipelined with II = reuse, so the
// multiply-accumulate over one output's K inputs is unrolled onto ceil(K / reuse) multipliers.
#ifndef SG_LAYERS_H
#define SG_LAYERS_H

#include "sg_types.h"

namespace sg {

// The multiply-accumulate of one output. CFG::kind 0: int8 / fixed-point weights, a multiply.
// 1: +1 / -1 weights packed 8 per byte (bit set: +1), an add or a subtract. 2: the same weights
// with sign inputs (-1, 0, +1): XNOR-popcount, +1 where the signs agree, -1 where they differ.
template <class CFG> struct Mac {
  typename CFG::acc_t acc;
  int32_t agree, nonzero;

  explicit Mac(typename CFG::acc_t bias) : acc(bias), agree(0), nonzero(0) {}

  void step(int32_t v, const typename CFG::w_t *w, int o, int k_size, int k) {
#pragma HLS INLINE
    if (CFG::kind == 0) {
      acc += typename CFG::acc_t(v) * typename CFG::acc_t(w[o * k_size + k]);
      return;
    }
    const int bytes = (k_size + 7) / 8;
    const bool plus = (uint8_t(w[o * bytes + (k >> 3)]) >> (k & 7)) & 1;
    if (CFG::kind == 1) {
      acc += plus ? typename CFG::acc_t(v) : typename CFG::acc_t(-v);
    } else {
      nonzero += v != 0;
      agree += (v != 0) && ((v > 0) == plus);
    }
  }

  // Both arms acc_t: under Vitis, acc + int is a wider ap_int than acc and ?: will not mix them.
  typename CFG::acc_t result() const {
    return CFG::kind == 2 ? typename CFG::acc_t(acc + 2 * agree - nonzero) : acc;
  }
};

// x - zero_point, or 0 outside the input (padding is the real value 0).
template <class CFG, class T_IN>
inline int32_t conv_input(const T_IN *x, int c, int iy, int ix) {
#pragma HLS INLINE
  if (iy < 0 || iy >= CFG::h || ix < 0 || ix >= CFG::w) return 0;
  return int32_t(x[(c * CFG::h + iy) * CFG::w + ix]) - CFG::zp_in;
}

// Convolution (groups = 1, grouped, or depthwise); weights [co][ci / groups][kh][kw].
template <class CFG, class T_IN, class T_OUT>
void conv2d(const T_IN x[CFG::ci * CFG::h * CFG::w], T_OUT y[CFG::co * CFG::ho * CFG::wo],
            const typename CFG::w_t w[], const typename CFG::acc_t bias[CFG::co],
            const rq_t rq[CFG::co]) {
  const int per_group_in = CFG::ci / CFG::groups, per_group_out = CFG::co / CFG::groups;
  const int k_size = per_group_in * CFG::kh * CFG::kw;
conv_pixels:
  for (int oy = 0; oy < CFG::ho; oy++) {
    for (int ox = 0; ox < CFG::wo; ox++) {
      for (int o = 0; o < CFG::co; o++) {
#pragma HLS PIPELINE II = CFG::reuse
        Mac<CFG> mac(bias[o]);
        const int group = o / per_group_out;
      conv_mac:
        for (int k = 0; k < k_size; k++) {
          const int c = group * per_group_in + k / (CFG::kh * CFG::kw);
          const int ky = (k / CFG::kw) % CFG::kh, kx = k % CFG::kw;
          mac.step(conv_input<CFG>(x, c, oy * CFG::sh - CFG::pt + ky, ox * CFG::sw - CFG::pl + kx),
                   w, o, k_size, k);
        }
        y[(o * CFG::ho + oy) * CFG::wo + ox] =
            requantize<T_OUT>(mac.result(), rq[o], CFG::lo, CFG::hi);
      }
    }
  }
}

// Fully connected: y[o] = requant(sum_k (x[k] - zp) * w[o][k] + bias[o]).
template <class CFG, class T_IN, class T_OUT>
void dense(const T_IN x[CFG::n_in], T_OUT y[CFG::n_out], const typename CFG::w_t w[],
           const typename CFG::acc_t bias[CFG::n_out], const rq_t rq[CFG::n_out]) {
dense_out:
  for (int o = 0; o < CFG::n_out; o++) {
#pragma HLS PIPELINE II = CFG::reuse
    Mac<CFG> mac(bias[o]);
  dense_mac:
    for (int k = 0; k < CFG::n_in; k++) mac.step(int32_t(x[k]) - CFG::zp_in, w, o, CFG::n_in, k);
    y[o] = requantize<T_OUT>(mac.result(), rq[o], CFG::lo, CFG::hi);
  }
}

// Max pooling (global when the kernel is the whole map); padding never wins.
template <class CFG, class T_IN, class T_OUT>
void max_pool2d(const T_IN x[CFG::c * CFG::h * CFG::w], T_OUT y[CFG::c * CFG::ho * CFG::wo]) {
pool_out:
  for (int c = 0; c < CFG::c; c++) {
    for (int oy = 0; oy < CFG::ho; oy++) {
      for (int ox = 0; ox < CFG::wo; ox++) {
#pragma HLS PIPELINE II = CFG::reuse
        int32_t best = CFG::lo;
        for (int ky = 0; ky < CFG::kh; ky++) {
          for (int kx = 0; kx < CFG::kw; kx++) {
            const int iy = oy * CFG::sh - CFG::pt + ky, ix = ox * CFG::sw - CFG::pl + kx;
            if (iy < 0 || iy >= CFG::h || ix < 0 || ix >= CFG::w) continue;
            const int32_t v = x[(c * CFG::h + iy) * CFG::w + ix];
            if (v > best) best = v;
          }
        }
        y[(c * CFG::ho + oy) * CFG::wo + ox] = T_OUT(best);
      }
    }
  }
}

// Average pooling (global when the kernel is the whole map): the window's sum of (x - zp),
// requantized by scale_in / (count * scale_out).
template <class CFG, class T_IN, class T_OUT>
void avg_pool2d(const T_IN x[CFG::c * CFG::h * CFG::w], T_OUT y[CFG::c * CFG::ho * CFG::wo],
                const rq_t rq[CFG::c]) {
avg_out:
  for (int c = 0; c < CFG::c; c++) {
    for (int oy = 0; oy < CFG::ho; oy++) {
      for (int ox = 0; ox < CFG::wo; ox++) {
#pragma HLS PIPELINE II = CFG::reuse
        typename CFG::acc_t acc = 0;
        for (int ky = 0; ky < CFG::kh; ky++) {
          for (int kx = 0; kx < CFG::kw; kx++) {
            const int iy = oy * CFG::sh + ky, ix = ox * CFG::sw + kx;
            acc += int32_t(x[(c * CFG::h + iy) * CFG::w + ix]) - CFG::zp_in;
          }
        }
        y[(c * CFG::ho + oy) * CFG::wo + ox] = requantize<T_OUT>(acc, rq[c], CFG::lo, CFG::hi);
      }
    }
  }
}

// y = requant(m_a * (a - zp_a) + m_b * (b - zp_b)), one shift for both.
template <class CFG, class T_A, class T_B, class T_OUT>
void add(const T_A a[CFG::size], const T_B b[CFG::size], T_OUT y[CFG::size], const rq_t rq[]) {
add_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    const int64_t acc = int64_t(CFG::m_a) * (int32_t(a[i]) - CFG::zp_a) +
                        int64_t(CFG::m_b) * (int32_t(b[i]) - CFG::zp_b);
    y[i] = requantize<T_OUT>(acc, rq[i / CFG::per_channel], CFG::lo, CFG::hi);
  }
}

// One input of a channel concatenation, requantized into its slice of the output.
template <class CFG, class T_IN, class T_OUT>
void concat_part(const T_IN x[CFG::size], T_OUT y[], const rq_t rq[]) {
concat_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    const int64_t acc = int64_t(CFG::m) * (int32_t(x[i]) - CFG::zp_in);
    y[CFG::offset + i] = requantize<T_OUT>(acc, rq[0], CFG::lo, CFG::hi);
  }
}

// Per-channel requantization from one format to another (scale_in / scale_out).
template <class CFG, class T_IN, class T_OUT>
void requant(const T_IN x[CFG::size], T_OUT y[CFG::size], const rq_t rq[]) {
requant_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    y[i] = requantize<T_OUT>(int32_t(x[i]) - CFG::zp_in, rq[i / CFG::per_channel], CFG::lo,
                             CFG::hi);
  }
}

// Relu / Clip on raw values: quantization is monotone, so the bounds are quantized bounds.
template <class CFG, class T_IN, class T_OUT>
void clamp(const T_IN x[CFG::size], T_OUT y[CFG::size]) {
clamp_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    int32_t v = x[i];
    y[i] = T_OUT(v < CFG::lo ? CFG::lo : (v > CFG::hi ? CFG::hi : v));
  }
}

// Sign(x - zp): -1, 0 or +1 (the input of an XNOR layer).
template <class CFG, class T_IN, class T_OUT>
void sign(const T_IN x[CFG::size], T_OUT y[CFG::size]) {
sign_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    const int32_t v = int32_t(x[i]) - CFG::zp_in;
    y[i] = T_OUT(v > 0 ? 1 : (v < 0 ? -1 : 0));
  }
}

// Sigmoid by lookup table: the input code (its top bits, past CFG::drop, when the input is wider
// than the table) indexes the output code.
template <class CFG, class T_IN, class T_OUT>
void sigmoid(const T_IN x[CFG::size], T_OUT y[CFG::size], const T_OUT table[]) {
sigmoid_loop:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = CFG::reuse
    y[i] = table[(int32_t(x[i]) - CFG::in_low) >> CFG::drop];
  }
}

// Softmax over a vector: e_k = exp table[(max - x_k) >> drop] (16-bit fixed point), then
// y_k = (e_k * divider + S / 2) / S + zero_point with S = 2^16 * sum(e).
template <class CFG, class T_IN, class T_OUT>
void softmax(const T_IN x[CFG::n], T_OUT y[CFG::n], const uint32_t table[]) {
  int32_t top = x[0];
softmax_max:
  for (int k = 1; k < CFG::n; k++) top = int32_t(x[k]) > top ? int32_t(x[k]) : top;
  uint32_t e[CFG::n];
  uint64_t sum = 0;
softmax_exp:
  for (int k = 0; k < CFG::n; k++) {
#pragma HLS PIPELINE II = 1
    int32_t d = (top - int32_t(x[k])) >> CFG::drop;
    if (d > CFG::entries - 1) d = CFG::entries - 1;
    e[k] = table[d];
    sum += e[k];
  }
  const int64_t total = int64_t(sum) << 16;
softmax_div:
  for (int k = 0; k < CFG::n; k++) {
#pragma HLS PIPELINE II = CFG::reuse
    int64_t v = (int64_t(e[k]) * CFG::divider + total / 2) / total + CFG::zp_out;
    y[k] = T_OUT(v < CFG::lo ? CFG::lo : (v > CFG::hi ? CFG::hi : v));
  }
}

}  // namespace sg

#endif
