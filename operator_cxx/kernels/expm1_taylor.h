// expm1 by its Taylor series in float64, shared by the DoReFa and DSQ kernels.  Both replay
// a numpy spec bit for bit, so the series is written as fixed Horner steps (basic float64
// operations only, no libm) that the spec repeats in the same order.
#pragma once

#include "fake_quant.h"  // QO_HD

namespace qo {

/*! \brief expm1(r) for a reduced argument r, finishing Horner's scheme from the 1/12! term:
 *  `p` is the Horner value through the 1/13! term (the constant 1/13! for a degree-13
 *  series; higher degrees fold their leading terms into it). */
QO_HD double expm1_taylor_from_13(double p, double r) {
  p = p * r + 0x1.1eed8eff8d898p-29;  // 1/12!
  p = p * r + 0x1.ae64567f544e4p-26;  // 1/11!
  p = p * r + 0x1.27e4fb7789f5cp-22;  // 1/10!
  p = p * r + 0x1.71de3a556c734p-19;  // 1/9!
  p = p * r + 0x1.a01a01a01a01ap-16;  // 1/8!
  p = p * r + 0x1.a01a01a01a01ap-13;  // 1/7!
  p = p * r + 0x1.6c16c16c16c17p-10;  // 1/6!
  p = p * r + 0x1.1111111111111p-7;   // 1/5!
  p = p * r + 0x1.5555555555555p-5;   // 1/4!
  p = p * r + 0x1.5555555555555p-3;   // 1/3!
  p = p * r + 0x1.0000000000000p-1;   // 1/2!
  p = p * r + 1.0;
  return p * r;
}

/*! \brief 1/13!, the leading coefficient of a degree-13 series. */
constexpr double kInvFact13 = 0x1.6124613a86d09p-33;

}  // namespace qo
