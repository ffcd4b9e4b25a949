// Where a job's tensors live in the memstore, by id prefix: the trainer's own (offloaded
// parameters, gradients, moments, activations), each run's under its own name, and the
// exchange of a job on several workers. The coordinator frees both, every run's, when the
// job's run ends.
#ifndef LUMEN_COMMON_JOB_TENSORS_H_
#define LUMEN_COMMON_JOB_TENSORS_H_

#include <cstdint>
#include <string>

namespace lumen {

inline std::string JobTensorPrefix(const std::string& job_id) { return job_id + "/"; }
// Run `run`'s (the job's resumes before it): a task told to stop may still be inside a step
// when the job runs again elsewhere, and what it writes late must not land in the new run's.
inline std::string JobRunTensorPrefix(const std::string& job_id, int64_t run) {
  return JobTensorPrefix(job_id) + "run" + std::to_string(run) + "/";
}
inline std::string JobReplicaPrefix(const std::string& job_id) { return job_id + ".replicas/"; }

}  // namespace lumen

#endif  // LUMEN_COMMON_JOB_TENSORS_H_
