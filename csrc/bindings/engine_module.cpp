// Python bindings of the engine core. Arrays cross zero-copy as numpy views whose base object keeps
// the owner alive; InvalidArgument becomes ValueError, ProtocolError and internal errors RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "ops/cpu_isa.h"
#include "pnl/core/block_allocator.h"
#include "pnl/core/scheduler.h"

namespace py = pybind11;
using namespace pnl::core;

namespace {

/// Token ids from a list, a numpy array or a torch tensor, checked before narrowing to int32: a
/// float array or an id past int32 is an error, never a silently different token.
std::vector<TokenId> token_ids(py::handle obj, const char* what) {
  py::array array = py::array::ensure(obj);
  if (!array) throw py::type_error(std::string(what) + " must be a sequence of integer token ids");
  const char kind = array.dtype().kind();
  if (array.size() > 0 && kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(what) + " must hold integer token ids, got dtype " +
                         py::str(array.dtype()).cast<std::string>());
  }
  auto ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(array);
  std::vector<TokenId> out(ids.size());
  const int64_t* data = ids.data();
  for (size_t i = 0; i < out.size(); ++i) {
    if (data[i] < 0 || data[i] > std::numeric_limits<TokenId>::max()) {
      throw py::value_error(std::string(what) + " must be in [0, 2^31), got " + std::to_string(data[i]));
    }
    out[i] = static_cast<TokenId>(data[i]);
  }
  return out;
}

template <typename T>
py::array view(const T* data, int64_t size, py::handle owner) {
  return py::array_t<T>({size}, {static_cast<int64_t>(sizeof(T))}, data, owner);
}

py::array field_view(py::object self, ScheduleOutput::Field f) {
  const auto& out = self.cast<const ScheduleOutput&>();
  return view(out.field(f), out.field_size(f), self);
}

StopParams make_stop_params(int32_t max_tokens, int32_t min_tokens, bool ignore_eos,
                            std::vector<TokenId> stop_token_ids, std::vector<TokenId> eos_token_ids) {
  return StopParams{max_tokens, min_tokens, ignore_eos, std::move(stop_token_ids), std::move(eos_token_ids)};
}

const char* status_name(SequenceStatus s) {
  switch (s) {
    case SequenceStatus::kWaiting: return "waiting";
    case SequenceStatus::kRunning: return "running";
    default: return "finished";
  }
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<StopParams>(m, "StopParams",
                         "The part of a request's SamplingParams that decides when its sequence finishes.")
      .def(py::init(&make_stop_params), py::arg("max_tokens") = 16, py::arg("min_tokens") = 0,
           py::arg("ignore_eos") = false, py::arg("stop_token_ids") = std::vector<TokenId>{},
           py::arg("eos_token_ids") = std::vector<TokenId>{})
      .def_readwrite("max_tokens", &StopParams::max_tokens)
      .def_readwrite("min_tokens", &StopParams::min_tokens)
      .def_readwrite("ignore_eos", &StopParams::ignore_eos)
      .def_readwrite("stop_token_ids", &StopParams::stop_token_ids)
      .def_readwrite("eos_token_ids", &StopParams::eos_token_ids);

  py::class_<SchedulerConfig>(m, "SchedulerConfig", "Sizes of the KV pool and of one engine step.")
      .def(py::init([](int32_t num_blocks, int32_t block_size, int32_t max_num_seqs,
                       int32_t max_num_batched_tokens, int32_t max_model_len, bool enable_prefix_caching) {
             SchedulerConfig c{num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
                               enable_prefix_caching};
             c.validate();
             return c;
           }),
           py::arg("num_blocks") = 1024, py::arg("block_size") = 16, py::arg("max_num_seqs") = 256,
           py::arg("max_num_batched_tokens") = 8192, py::arg("max_model_len") = 4096,
           py::arg("enable_prefix_caching") = true)
      .def_readonly("num_blocks", &SchedulerConfig::num_blocks)
      .def_readonly("block_size", &SchedulerConfig::block_size)
      .def_readonly("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readonly("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readonly("max_model_len", &SchedulerConfig::max_model_len)
      .def_readonly("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching);

  py::class_<BlockAllocatorStats>(m, "BlockAllocatorStats")
      .def_readonly("num_blocks", &BlockAllocatorStats::num_blocks)
      .def_readonly("num_used_blocks", &BlockAllocatorStats::num_used_blocks)
      .def_readonly("num_cached_blocks", &BlockAllocatorStats::num_cached_blocks)
      .def_readonly("prefix_queries", &BlockAllocatorStats::prefix_queries, "tokens looked up at admission")
      .def_readonly("prefix_hits", &BlockAllocatorStats::prefix_hits, "tokens found in the prefix cache");

  py::class_<BlockAllocator>(m, "BlockAllocator",
                             "KV block pool with reference counts and a prefix cache (see block_allocator.h).")
      .def(py::init<int32_t, int32_t, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockAllocator::num_used_blocks)
      .def_property_readonly("stats", &BlockAllocator::stats)
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block"))
      .def("is_cached", &BlockAllocator::is_cached, py::arg("block"))
      .def("allocate", [](BlockAllocator& a) {
        if (a.num_free_blocks() == 0) throw py::value_error("no free KV block");
        return a.allocate();
      }, "Takes a free block (evicting its cached prefix); ValueError when none is free.")
      .def("release", &BlockAllocator::release, py::arg("block"))
      .def("reset_prefix_cache", &BlockAllocator::reset_prefix_cache,
           "Forgets every cached prefix; False (and nothing done) while any block is used.")
      .def("acquire", &BlockAllocator::acquire, py::arg("block"))
      .def("match_prefix",
           [](const BlockAllocator& a, py::handle tokens, int32_t max_blocks) {
             std::vector<TokenId> ids = token_ids(tokens, "tokens");
             std::vector<BlockId> out;
             a.match_prefix(ids.data(), static_cast<int32_t>(ids.size()), max_blocks, out);
             return out;
           },
           py::arg("tokens"), py::arg("max_blocks") = 1 << 30,
           "Cached blocks matching the full blocks at the start of tokens (not acquired).")
      .def("cache_full_block",
           [](BlockAllocator& a, BlockId block, BlockId parent, py::handle tokens) {
             std::vector<TokenId> ids = token_ids(tokens, "tokens");
             if (static_cast<int32_t>(ids.size()) != a.block_size()) {
               throw py::value_error("tokens must hold exactly block_size ids");
             }
             a.cache_full_block(block, parent, ids.data());
           },
           py::arg("block"), py::arg("parent"), py::arg("tokens"));

  py::class_<Sequence>(m, "Sequence", "A snapshot of one live sequence.")
      .def_readonly("id", &Sequence::id)
      .def_readonly("token_ids", &Sequence::token_ids)
      .def_readonly("num_prompt_tokens", &Sequence::num_prompt_tokens)
      .def_readonly("num_computed_tokens", &Sequence::num_computed_tokens)
      .def_readonly("num_cached_tokens", &Sequence::num_cached_tokens)
      .def_readonly("num_preemptions", &Sequence::num_preemptions)
      .def_readonly("num_placeholders", &Sequence::num_placeholders,
                    "trailing token_ids (-1) that pending steps sample")
      .def_readonly("block_table", &Sequence::block_table)
      .def_property_readonly("status", [](const Sequence& s) { return status_name(s.status); });

  py::class_<FinishedSequence>(m, "FinishedSequence")
      .def_readonly("id", &FinishedSequence::id)
      .def_property_readonly("reason", [](const FinishedSequence& f) { return to_string(f.reason); },
                             "'stop' or 'length'")
      .def_property_readonly("stop_token", [](const FinishedSequence& f) -> py::object {
        if (f.stop_token < 0) return py::none();
        return py::int_(f.stop_token);
      }, "the stop token id that finished it, else None")
      .def_readonly("num_generated_tokens", &FinishedSequence::num_generated_tokens)
      .def_readonly("num_cached_tokens", &FinishedSequence::num_cached_tokens)
      .def("__repr__", [](const FinishedSequence& f) {
        return "FinishedSequence(id=" + std::to_string(f.id) + ", reason='" + to_string(f.reason) + "')";
      });

  py::class_<ScheduleOutput>(m, "ScheduleOutput",
                             "One step's batch. Arrays are zero-copy int32 views, valid until the next "
                             "schedule(); see schedule_output.h for the layout.")
      .def_readonly("num_tokens", &ScheduleOutput::num_tokens)
      .def_readonly("num_seqs", &ScheduleOutput::num_seqs)
      .def_readonly("num_sampled", &ScheduleOutput::num_sampled)
      .def_readonly("num_decode_seqs", &ScheduleOutput::num_decode_seqs)
      .def_readonly("block_table_width", &ScheduleOutput::block_table_width)
      .def_readonly("max_seqlen_q", &ScheduleOutput::max_seqlen_q)
      .def_readonly("max_context_len", &ScheduleOutput::max_context_len)
      .def_readonly("num_placeholders", &ScheduleOutput::num_placeholders,
                    "decode inputs that the previous, still pending step samples")
      .def_property_readonly("arena", [](py::object self) {
        const auto& out = self.cast<const ScheduleOutput&>();
        return view(out.arena.data(), out.arena_size(), self);
      }, "all int32 arrays back to back, for one host-to-device copy")
      .def_property_readonly("field_sizes", [](const ScheduleOutput& out) {
        py::tuple sizes(static_cast<size_t>(ScheduleOutput::kNumFields));
        for (int f = 0; f < ScheduleOutput::kNumFields; ++f) {
          sizes[f] = out.field_size(static_cast<ScheduleOutput::Field>(f));
        }
        return sizes;
      }, "lengths of (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens, sample_indices, "
         "block_tables, placeholder_rows, placeholder_sources) in the arena")
      .def_property_readonly("input_ids", [](py::object s) { return field_view(s, ScheduleOutput::kInputIds); })
      .def_property_readonly("positions", [](py::object s) { return field_view(s, ScheduleOutput::kPositions); })
      .def_property_readonly("slot_mapping",
                             [](py::object s) { return field_view(s, ScheduleOutput::kSlotMapping); })
      .def_property_readonly("cu_seqlens_q",
                             [](py::object s) { return field_view(s, ScheduleOutput::kCuSeqlensQ); })
      .def_property_readonly("context_lens",
                             [](py::object s) { return field_view(s, ScheduleOutput::kContextLens); })
      .def_property_readonly("sample_indices",
                             [](py::object s) { return field_view(s, ScheduleOutput::kSampleIndices); })
      .def_property_readonly("placeholder_rows",
                             [](py::object s) { return field_view(s, ScheduleOutput::kPlaceholderRows); },
                             "input_ids rows whose token the previous step samples")
      .def_property_readonly("placeholder_sources",
                             [](py::object s) { return field_view(s, ScheduleOutput::kPlaceholderSources); },
                             "each one's row among the previous step's sampled tokens")
      .def_property_readonly("block_tables", [](py::object self) {
        const auto& out = self.cast<const ScheduleOutput&>();
        const int64_t w = out.block_table_width;
        return py::array_t<int32_t>({static_cast<int64_t>(out.num_seqs), w},
                                    {static_cast<int64_t>(w * sizeof(int32_t)), static_cast<int64_t>(sizeof(int32_t))},
                                    out.field(ScheduleOutput::kBlockTables), self);
      }, "[num_seqs, block_table_width], padded with -1")
      .def_property_readonly("seq_ids", [](py::object self) {
        const auto& out = self.cast<const ScheduleOutput&>();
        return view(out.seq_ids.data(), static_cast<int64_t>(out.seq_ids.size()), self);
      }, "[num_seqs] int64, batch order")
      .def_property_readonly("sampled_seq_ids", [](py::object self) {
        const auto& out = self.cast<const ScheduleOutput&>();
        return view(out.sampled_seq_ids.data(), static_cast<int64_t>(out.sampled_seq_ids.size()), self);
      }, "[num_sampled] int64, the order of postprocess()'s tokens")
      .def_readonly("preempted_seq_ids", &ScheduleOutput::preempted_seq_ids);

  py::class_<Scheduler>(m, "Scheduler",
                        "Continuous-batching scheduler: schedule() -> run the model -> postprocess(tokens); "
                        "the next step may be scheduled while one is pending (see scheduler.h).")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def("add", [](Scheduler& s, py::handle prompt, const StopParams& params) {
        return s.add(token_ids(prompt, "prompt"), params);
      }, py::arg("prompt"), py::arg("params") = StopParams{},
         "Queues a prompt (token ids) and returns its sequence id; ValueError if it can never run.")
      .def("abort", &Scheduler::abort, py::arg("seq_id"),
           "Finishes a sequence now and frees its blocks; False for an unknown or finished id.")
      .def("finish", [](Scheduler& s, SeqId id, const std::string& reason) {
        FinishReason r = FinishReason::kNone;
        if (reason == "stop") r = FinishReason::kStop;
        if (reason == "length") r = FinishReason::kLength;
        if (r == FinishReason::kNone) {
          throw py::value_error("finish reason must be 'stop' or 'length', got '" + reason + "'");
        }
        return s.finish(id, r);
      }, py::arg("seq_id"), py::arg("reason"),
         "Finishes a live sequence for a reason found outside the scheduler (a stop string: 'stop'), "
         "frees its blocks, and returns its FinishedSequence; None for an unknown or finished id.")
      .def("schedule", &Scheduler::schedule, py::return_value_policy::reference_internal)
      .def("postprocess", [](Scheduler& s, py::handle sampled) {
        std::vector<TokenId> ids = token_ids(sampled, "sampled tokens");
        return s.postprocess(ids.data(), static_cast<int64_t>(ids.size()));
      }, py::arg("sampled"),
         "One token per sampled sequence, in ScheduleOutput order; returns the sequences that finished "
         "(reason 'stop' or 'length'; abort() reports its own).")
      .def("reset_prefix_cache", &Scheduler::reset_prefix_cache,
           "Forgets every cached prefix; False (and nothing done) while a sequence holds KV blocks.")
      .def("get_sequence", [](const Scheduler& s, SeqId id) -> py::object {
        const Sequence* seq = s.find(id);
        return seq ? py::cast(*seq) : py::none();
      }, py::arg("seq_id"), "A copy of a live sequence, or None.")
      .def_property_readonly("has_unfinished", &Scheduler::has_unfinished)
      .def_property_readonly("step_pending", &Scheduler::step_pending)
      .def_property_readonly("num_pending_steps", &Scheduler::num_pending_steps,
                             "scheduled steps awaiting postprocess() (0, 1, or 2 when overlapped)")
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_preemptions", &Scheduler::num_preemptions)
      .def_property_readonly("config", &Scheduler::config)
      .def_property_readonly("stats", [](const Scheduler& s) { return s.allocator().stats(); })
      .def_property_readonly("num_free_blocks", [](const Scheduler& s) { return s.allocator().num_free_blocks(); });
}

void bind_cpu_isa(py::module_& m) {
  using namespace pnl::ops;
  m.def("cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa())); },
        "The instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'baseline'.");
  m.def("supported_cpu_isas", [] {
    std::vector<std::string> names;
    for (CpuIsa isa : supported_cpu_isas()) names.emplace_back(cpu_isa_name(isa));
    return names;
  }, "The instruction sets this build has kernels for and this CPU runs, best first.");
  m.def("set_cpu_isa", [](std::string_view name) { set_cpu_isa(parse_cpu_isa(name)); }, py::arg("name"),
        "Runs the CPU kernels of `name` from now on; ValueError if this build or CPU lacks them.");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "Professional nano-vLLM engine core (C++) and torch ops (torch.ops.pnl)";
  m.attr("__version__") = PNL_VERSION;
  m.attr("torch_version") = PNL_TORCH_VERSION;  // the torch this binary was compiled against
  py::register_exception<ProtocolError>(m, "ProtocolError", PyExc_RuntimeError);
  bind_engine(m);
  bind_cpu_isa(m);
}
