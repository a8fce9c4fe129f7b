#include "routed_lora_cpu_operands.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>

#include "../../kernels/routed_lora_mix_cpu.h"
#include "../torch_to_kernel.h"

namespace mhr_ops {

LoraGroupIds lora_group_ids(const at::Tensor& group_ids) {
  LoraGroupIds ids;
  ids.data = group_ids.const_data_ptr();
  ids.type = kernel_index_type(group_ids, "group_ids");
  ids.stride = group_ids.stride(0);
  return ids;
}

LoraOperands lora_operands(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const LoraDims& d) {
  const auto ct = accumulation_dtype(x.scalar_type());
  return {rows_layout(x.to(ct)), weights.to(ct), A.to(ct).contiguous().view({d.heads, d.skills, d.dk_in * d.rank}),
          B.to(ct).contiguous().view({d.heads, d.skills, d.rank * d.dk_out})};
}

std::pair<at::Tensor, at::Tensor> mix_groups(const LoraOperands& o, const std::vector<int64_t>& groups,
                                             const LoraDims& d, double scale) {
  const int64_t n = static_cast<int64_t>(groups.size());
  const at::Tensor w = o.w.index_select(0, at::tensor(groups, at::kLong)).permute({1, 0, 2});  // [h, n, S]
  const at::Tensor a = at::bmm(w, o.A)                                                         // [h, n, dk_in * r]
                           .transpose(0, 1)
                           .reshape({n, d.d_in, d.rank});
  const at::Tensor b = at::bmm(w, o.B);  // [h, n, r * dk_out]
  const at::Tensor bt = swap_pairs(b.view({d.heads, n, d.rank, d.dk_out}), scale).view({n, d.d_out, d.rank});
  return {a, bt};
}

at::Tensor swap_pairs(const at::Tensor& src_in, double scale) {
  const at::Tensor src = src_in.contiguous();
  at::Tensor out = at::empty({src.size(1), src.size(0), src.size(3), src.size(2)}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "swap_pairs", [&] {
    lora_swap_pairs_cpu<scalar_t>(src.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src.size(0), src.size(1),
                                  src.size(2), src.size(3), static_cast<scalar_t>(scale));
  });
  return out;
}

at::Tensor row_weights(const LoraOperands& o, const std::vector<int64_t>& row_group) {
  return o.w.index_select(0, at::tensor(row_group, at::kLong));
}

at::Tensor heads_of(const at::Tensor& t, int64_t h) { return t.reshape({t.size(0), h, -1}).transpose(0, 1); }

at::Tensor a_cat(const LoraOperands& o, const LoraDims& d) {
  return o.A.view({d.heads, d.skills, d.dk_in, d.rank}).permute({0, 2, 1, 3}).reshape({d.heads, d.dk_in, -1});
}

at::Tensor b_cat(const LoraOperands& o, const LoraDims& d) { return o.B.view({d.heads, d.skills * d.rank, d.dk_out}); }

namespace {

LoraMixDims mix_dims(const LoraDims& d) { return {d.rows, d.heads, d.skills, d.rank}; }

// fn(begin, end) over ranges of rows on ATen's threads.
template <typename Fn>
void for_rows(const LoraDims& d, Fn&& fn) {
  at::parallel_for(0, d.rows, 256, fn);
}

}  // namespace

at::Tensor mix_rows(const at::Tensor& proj_in, const at::Tensor& row_w, const LoraDims& d) {
  const at::Tensor proj = proj_in.contiguous();
  at::Tensor z = at::empty({d.rows, d.rank}, proj.options());
  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "mix_rows", [&] {
    for_rows(d, [&](int64_t b, int64_t e) {
      lora_mix_rows_cpu<scalar_t>(mix_dims(d), row_w.const_data_ptr<scalar_t>(), proj.const_data_ptr<scalar_t>(),
                                  z.data_ptr<scalar_t>(), b, e);
    });
  });
  return z;
}

at::Tensor spread_rows(const at::Tensor& v_in, const at::Tensor& row_w, const LoraDims& d) {
  const at::Tensor v = v_in.contiguous();
  at::Tensor out = at::empty({d.heads, d.rows, d.skills * d.rank}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "spread_rows", [&] {
    for_rows(d, [&](int64_t b, int64_t e) {
      lora_spread_rows_cpu<scalar_t>(mix_dims(d), row_w.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), b, e);
    });
  });
  return out;
}

at::Tensor row_weight_grads(const at::Tensor& U_in, const at::Tensor& gz_in, const at::Tensor& T_in,
                            const at::Tensor& z_in, const LoraDims& d) {
  const at::Tensor U = U_in.contiguous(), gz = gz_in.contiguous(), T = T_in.contiguous(), z = z_in.contiguous();
  at::Tensor out = at::empty({d.rows, d.heads, d.skills}, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "row_weight_grads", [&] {
    for_rows(d, [&](int64_t b, int64_t e) {
      lora_row_weight_grads_cpu<scalar_t>(mix_dims(d), U.const_data_ptr<scalar_t>(), gz.const_data_ptr<scalar_t>(),
                                          T.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                          out.data_ptr<scalar_t>(), b, e);
    });
  });
  return out;
}

void fill_rows(const at::Tensor& t, const std::vector<LoraRun>& runs, double value) {
  for (const LoraRun& run : runs) t.narrow(0, run.start, run.rows).fill_(value);
}

}  // namespace mhr_ops
