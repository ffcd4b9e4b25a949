#include "common/yaml_proto.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/job.pb.h"

namespace lumen {
namespace {

using ::testing::HasSubstr;

TEST(YamlProtoTest, FillsNestedScalarsEnumsAndLists) {
  JobSpec spec;
  ASSERT_TRUE(YamlToProto(R"(
name: demo
model: {hidden_size: 256, rope_theta: 1e4, tie_word_embeddings: true}
data: {path: /x.bin, token_dtype: uint32, order: shuffled, seed: 7}
optimizer: {lr: 3.0e-4, betas: [0.9, 0.95]}
)",
                          &spec)
                  .ok());
  EXPECT_EQ(spec.name(), "demo");
  EXPECT_EQ(spec.model().hidden_size(), 256);
  EXPECT_TRUE(spec.model().has_hidden_size());
  EXPECT_FALSE(spec.model().has_vocab_size());
  EXPECT_DOUBLE_EQ(spec.model().rope_theta(), 1e4);
  EXPECT_TRUE(spec.model().tie_word_embeddings());
  EXPECT_EQ(spec.data().token_dtype(), TOKEN_DTYPE_UINT32);
  EXPECT_EQ(spec.data().order(), DATA_ORDER_SHUFFLED);
  ASSERT_EQ(spec.optimizer().betas_size(), 2);
  EXPECT_DOUBLE_EQ(spec.optimizer().betas(1), 0.95);
}

TEST(YamlProtoTest, ErrorsNameTheField) {
  JobSpec spec;
  struct Case {
    const char* yaml;
    const char* fragment;
  } cases[] = {
      {"model: {hiden_size: 3}", "model.hiden_size (line 1): unknown field"},
      {"train: {steps: ten}", "train.steps (line 1): expected an integer, got 'ten'"},
      {"optimizer: {betas: [0.9, x]}", "optimizer.betas[1]"},
      {"optimizer: {betas: 0.9}", "optimizer.betas (line 1): expected a list"},
      {"data: {token_dtype: int8}", "'int8' is not one of uint16, uint32"},
      {"model: [1, 2]", "model (line 1): expected a mapping"},
      {"model: {tie_word_embeddings: maybe}", "expected true or false"},
      {"name: [a", "invalid YAML at line"},
      {"", "the spec is empty"},
      {"train: {steps: 1.5}", "train.steps (line 1): expected an integer"},
      {"model: {rope_theta: .nan}", "expected a finite number"},
  };
  for (const Case& c : cases) {
    absl::Status status = YamlToProto(c.yaml, &spec);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.fragment)) << c.yaml;
  }
}

}  // namespace
}  // namespace lumen
