// Basic vocabulary shared by the engine core: ids, statuses, finish reasons, stop parameters.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pnl::core {

using SeqId = int64_t;
using BlockId = int32_t;
using TokenId = int32_t;

enum class SequenceStatus : uint8_t { kWaiting, kRunning, kFinished };

enum class FinishReason : uint8_t {
  kNone,    // still running
  kStop,    // an EOS id or one of the stop token ids was sampled
  kLength,  // max_tokens generated, or the sequence reached max_model_len
  kAbort,   // abort() was called
};

inline const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
    default: return "none";
  }
}

/// The part of a request's sampling parameters that decides when a sequence finishes.
/// The Python side keeps everything else (temperature, top_p, stop strings, ...).
struct StopParams {
  int32_t max_tokens = 16;             // >= 1
  int32_t min_tokens = 0;              // EOS and stop tokens do not finish before this many
  bool ignore_eos = false;             // EOS ids do not finish the sequence (stop ids still do)
  std::vector<TokenId> stop_token_ids;
  std::vector<TokenId> eos_token_ids;  // a model may have several
};

/// Thrown for invalid arguments (bad config, a request that can never fit, unknown ids).
/// Python sees it as ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown when the caller breaks the call protocol (postprocess without schedule, ...).
/// Python sees it as RuntimeError.
class ProtocolError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

}  // namespace pnl::core
