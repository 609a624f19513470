// slimgraph HLS layer library, io=stream: layers connected by FIFOs (hls::stream), one value per
// token, feature maps in raster order with the channels of a pixel together ([H][W][C]).
// Convolutions and pools keep a line buffer of kernel-height rows, not the whole map.
#ifndef SG_STREAM_H
#define SG_STREAM_H

#include "sg_layers.h"

namespace sg {

// Window layers (conv, max / average pool) over a line buffer of CFG::kh padded rows. Padded
// positions hold CFG::pad_value. For each output position the window is handed to the functor.
template <class CFG, class T_IN, class OP>
void line_buffer_windows(hls::stream<T_IN> &x, OP &op) {
  const int padded_w = CFG::w + CFG::pl + CFG::pr;
  const int padded_h = CFG::h + CFG::pt + CFG::pb;
  T_IN lines[CFG::kh][padded_w][CFG::ci];
#pragma HLS ARRAY_PARTITION variable = lines complete dim = 1
rows:
  for (int r = 0; r < padded_h; r++) {
    const int slot = r % CFG::kh;
  fill:
    for (int px = 0; px < padded_w; px++) {
      for (int c = 0; c < CFG::ci; c++) {
#pragma HLS PIPELINE II = 1
        const bool inside = r >= CFG::pt && r < CFG::pt + CFG::h && px >= CFG::pl &&
                            px < CFG::pl + CFG::w;
        lines[slot][px][c] = inside ? x.read() : T_IN(CFG::pad_value);
      }
    }
    const int first = r - (CFG::kh - 1);  // the top padded row of a window ending here
    if (first < 0 || first % CFG::sh != 0 || first / CFG::sh >= CFG::ho) continue;
  outputs:
    for (int ox = 0; ox < CFG::wo; ox++) op.pixel(lines, first, ox);
  }
}

template <class CFG, class T_IN, class T_OUT> struct ConvWindow {
  hls::stream<T_OUT> &y;
  const typename CFG::w_t *w;
  const typename CFG::acc_t *bias;
  const rq_t *rq;

  template <class LINES> void pixel(LINES &lines, int first, int ox) {
    const int per_group_in = CFG::ci / CFG::groups, per_group_out = CFG::co / CFG::groups;
    const int k_size = per_group_in * CFG::kh * CFG::kw;
    for (int o = 0; o < CFG::co; o++) {
#pragma HLS PIPELINE II = CFG::reuse
      Mac<CFG> mac(bias[o]);
      const int group = o / per_group_out;
      for (int k = 0; k < k_size; k++) {
        const int c = group * per_group_in + k / (CFG::kh * CFG::kw);
        const int ky = (k / CFG::kw) % CFG::kh, kx = k % CFG::kw;
        const int32_t v = int32_t(lines[(first + ky) % CFG::kh][ox * CFG::sw + kx][c]) - CFG::zp_in;
        mac.step(v, w, o, k_size, k);
      }
      y.write(requantize<T_OUT>(mac.result(), rq[o], CFG::lo, CFG::hi));
    }
  }
};

template <class CFG, class T_IN, class T_OUT>
void conv2d_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const typename CFG::w_t w[],
                   const typename CFG::acc_t bias[CFG::co], const rq_t rq[CFG::co]) {
  ConvWindow<CFG, T_IN, T_OUT> op = {y, w, bias, rq};
  line_buffer_windows<CFG, T_IN>(x, op);
}

template <class CFG, class T_IN, class T_OUT> struct PoolWindow {
  hls::stream<T_OUT> &y;
  const rq_t *rq;

  template <class LINES> void pixel(LINES &lines, int first, int ox) {
    for (int c = 0; c < CFG::ci; c++) {
#pragma HLS PIPELINE II = CFG::reuse
      int64_t acc = CFG::average ? 0 : int64_t(CFG::lo);
      for (int ky = 0; ky < CFG::kh; ky++) {
        for (int kx = 0; kx < CFG::kw; kx++) {
          const int32_t v = lines[(first + ky) % CFG::kh][ox * CFG::sw + kx][c];
          if (CFG::average) acc += v - CFG::zp_in;
          else if (v > acc) acc = v;
        }
      }
      y.write(CFG::average ? requantize<T_OUT>(acc, rq[c], CFG::lo, CFG::hi) : T_OUT(acc));
    }
  }
};

template <class CFG, class T_IN, class T_OUT>
void pool2d_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const rq_t rq[]) {
  PoolWindow<CFG, T_IN, T_OUT> op = {y, rq};
  line_buffer_windows<CFG, T_IN>(x, op);
}

// Fully connected over a stream: the input vector is gathered, then one output per step.
template <class CFG, class T_IN, class T_OUT>
void dense_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const typename CFG::w_t w[],
                  const typename CFG::acc_t bias[CFG::n_out], const rq_t rq[CFG::n_out]) {
  T_IN in[CFG::n_in];
read:
  for (int k = 0; k < CFG::n_in; k++) in[k] = x.read();
  T_OUT out[CFG::n_out];
  dense<CFG>(in, out, w, bias, rq);
write:
  for (int o = 0; o < CFG::n_out; o++) y.write(out[o]);
}

// Element-wise layers on streams: one token in (two for add), one token out. The channel of a
// token is its index modulo the channel count (channels are innermost).
template <class CFG, class T_A, class T_B, class T_OUT>
void add_stream(hls::stream<T_A> &a, hls::stream<T_B> &b, hls::stream<T_OUT> &y, const rq_t rq[]) {
add_tokens:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = 1
    const int64_t acc = int64_t(CFG::m_a) * (int32_t(a.read()) - CFG::zp_a) +
                        int64_t(CFG::m_b) * (int32_t(b.read()) - CFG::zp_b);
    y.write(requantize<T_OUT>(acc, rq[i % CFG::channels], CFG::lo, CFG::hi));
  }
}

template <class CFG, class T_IN, class T_OUT>
void requant_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const rq_t rq[]) {
requant_tokens:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = 1
    y.write(requantize<T_OUT>(int32_t(x.read()) - CFG::zp_in, rq[i % CFG::channels], CFG::lo,
                              CFG::hi));
  }
}

template <class CFG, class T_IN, class T_OUT>
void clamp_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y) {
clamp_tokens:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = 1
    const int32_t v = x.read();
    y.write(T_OUT(v < CFG::lo ? CFG::lo : (v > CFG::hi ? CFG::hi : v)));
  }
}

template <class CFG, class T_IN, class T_OUT>
void sign_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y) {
sign_tokens:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = 1
    const int32_t v = int32_t(x.read()) - CFG::zp_in;
    y.write(T_OUT(v > 0 ? 1 : (v < 0 ? -1 : 0)));
  }
}

// Channel concatenation of two maps: per pixel, A's channels then B's, each requantized.
template <class CFG, class T_A, class T_B, class T_OUT>
void concat_stream(hls::stream<T_A> &a, hls::stream<T_B> &b, hls::stream<T_OUT> &y,
                   const rq_t rq[]) {
concat_pixels:
  for (int p = 0; p < CFG::pixels; p++) {
    for (int c = 0; c < CFG::ca; c++) {
#pragma HLS PIPELINE II = 1
      y.write(requantize<T_OUT>(int64_t(CFG::m_a) * (int32_t(a.read()) - CFG::zp_a), rq[0],
                                CFG::lo, CFG::hi));
    }
    for (int c = 0; c < CFG::cb; c++) {
#pragma HLS PIPELINE II = 1
      y.write(requantize<T_OUT>(int64_t(CFG::m_b) * (int32_t(b.read()) - CFG::zp_b), rq[0],
                                CFG::lo, CFG::hi));
    }
  }
}

template <class CFG, class T_IN, class T_OUT>
void sigmoid_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const T_OUT table[]) {
sigmoid_tokens:
  for (int i = 0; i < CFG::size; i++) {
#pragma HLS PIPELINE II = 1
    y.write(table[(int32_t(x.read()) - CFG::in_low) >> CFG::drop]);
  }
}

template <class CFG, class T_IN, class T_OUT>
void softmax_stream(hls::stream<T_IN> &x, hls::stream<T_OUT> &y, const uint32_t table[]) {
  T_IN in[CFG::n];
  T_OUT out[CFG::n];
  for (int k = 0; k < CFG::n; k++) in[k] = x.read();
  softmax<CFG>(in, out, table);
  for (int k = 0; k < CFG::n; k++) y.write(out[k]);
}

// A tensor read by two layers: copy each token to both FIFOs.
template <class T, int SIZE> void clone_stream(hls::stream<T> &x, hls::stream<T> &a, hls::stream<T> &b) {
clone_tokens:
  for (int i = 0; i < SIZE; i++) {
#pragma HLS PIPELINE II = 1
    const T v = x.read();
    a.write(v);
    b.write(v);
  }
}

}  // namespace sg

#endif
