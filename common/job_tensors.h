// Where a job's tensors live in the memstore, by id prefix: the trainer's own (offloaded
// parameters, gradients, moments, activations) and the exchange of a job on several workers.
// The coordinator frees both when the job's run ends.
#ifndef LUMEN_COMMON_JOB_TENSORS_H_
#define LUMEN_COMMON_JOB_TENSORS_H_

#include <string>

namespace lumen {

inline std::string JobTensorPrefix(const std::string& job_id) { return job_id + "/"; }
inline std::string JobReplicaPrefix(const std::string& job_id) { return job_id + ".replicas/"; }

}  // namespace lumen

#endif  // LUMEN_COMMON_JOB_TENSORS_H_
