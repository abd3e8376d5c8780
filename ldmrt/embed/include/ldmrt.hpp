// ldmrt.hpp: a C++17 RAII wrapper over ldmrt.h (header only; link with -lldmrt).
//
//   ldmrt::Pipeline pipeline("out/digits");
//   ldmrt::Result image = pipeline.generate(ldmrt::Request().prompt("a red 7 on a white background"));
//   image.save("seven.png");
//
// Every failing call throws ldmrt::Error (status, field, message). Pipeline, Result and Cancel
// own their C handles (move-only); a Request owns copies of the strings it was given, and the
// caller's arrays (ldmrt_tensor) stay the caller's: they must outlive the generate call.
#ifndef LDMRT_HPP
#define LDMRT_HPP

#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ldmrt.h"

namespace ldmrt {

class Error : public std::runtime_error {
public:
    Error(ldmrt_status status, std::string message, std::string field)
        : std::runtime_error(std::move(message)), status_(status), field_(std::move(field)) {}
    ldmrt_status status() const noexcept { return status_; }
    const std::string &field() const noexcept { return field_; }   // the input at fault, or ""
    const char *status_name() const noexcept { return ldmrt_status_name(status_); }

private:
    ldmrt_status status_;
    std::string field_;
};

inline void check(ldmrt_status status) {
    if (status != LDMRT_OK)
        throw Error(status, ldmrt_last_error(), ldmrt_last_error_field());
}

// Start (or join) Python with a venv; optional: the first Pipeline does it with the defaults.
inline void init(const std::string &venv = "") {
    ldmrt_init_options options;
    ldmrt_init_options_init(&options);
    options.venv = venv.empty() ? nullptr : venv.c_str();
    check(ldmrt_init(&options));
}

class Cancel {
public:
    Cancel() { check(ldmrt_cancel_create(&token_)); }
    ~Cancel() { ldmrt_cancel_destroy(token_); }
    Cancel(const Cancel &) = delete;
    Cancel &operator=(const Cancel &) = delete;
    void trigger() noexcept { ldmrt_cancel_trigger(token_); }   // any thread
    void reset() noexcept { ldmrt_cancel_reset(token_); }
    bool triggered() const noexcept { return ldmrt_cancel_triggered(token_) != 0; }
    ldmrt_cancel *get() const noexcept { return token_; }

private:
    ldmrt_cancel *token_ = nullptr;
};

class Request {
public:
    Request() { ldmrt_request_init(&request_); }
    Request(const Request &other) : request_(other.request_), strings_(other.strings_) { relink(other); }
    Request &operator=(const Request &other) {
        if (this != &other) {
            request_ = other.request_;
            strings_ = other.strings_;
            relink(other);          // the copied struct points into other's strings until here
        }
        return *this;
    }

    Request &prompt(std::string text) { return text_(kPrompt, std::move(text), &ldmrt_request::prompt); }
    Request &negative_prompt(std::string text) {
        return text_(kNegative, std::move(text), &ldmrt_request::negative_prompt);
    }
    Request &sampler(std::string name) { return text_(kSampler, std::move(name), &ldmrt_request::sampler); }
    Request &layout_json(std::string json) { return text_(kLayout, std::move(json), &ldmrt_request::layout_json); }
    Request &steps(int32_t value) { request_.steps = value; return *this; }
    Request &guidance(double value) { request_.guidance = value; return *this; }
    Request &eta(double value) { request_.eta = value; return *this; }
    Request &seed(int64_t value) { request_.seed = value; return *this; }
    Request &size(int32_t height, int32_t width) { request_.height = height; request_.width = width; return *this; }
    Request &batch(int32_t value) { request_.batch = value; return *this; }
    Request &strength(double value) { request_.strength = value; return *this; }
    Request &class_labels(const std::vector<int32_t> &labels) {
        labels_ = labels;
        request_.class_labels = labels_.data();
        request_.num_class_labels = static_cast<int32_t>(labels_.size());
        return *this;
    }
    // Every other field (arrays: the caller's memory, kept alive through generate).
    ldmrt_request &fields() noexcept { return request_; }
    const ldmrt_request *get() const noexcept { return &request_; }

private:
    enum { kPrompt, kNegative, kSampler, kLayout, kStrings };
    using Field = const char *ldmrt_request::*;
    static constexpr Field kFields[kStrings] = {&ldmrt_request::prompt, &ldmrt_request::negative_prompt,
                                                &ldmrt_request::sampler, &ldmrt_request::layout_json};

    Request &text_(int slot, std::string text, Field field) {
        strings_[slot] = std::move(text);
        request_.*field = strings_[slot].c_str();
        set_[slot] = true;
        return *this;
    }
    void relink(const Request &other) {
        for (int slot = 0; slot < kStrings; slot++) {
            set_[slot] = other.set_[slot];
            if (set_[slot])
                request_.*kFields[slot] = strings_[slot].c_str();
        }
        labels_ = other.labels_;
        if (!labels_.empty())
            request_.class_labels = labels_.data();
    }

    ldmrt_request request_;
    std::vector<std::string> strings_ = std::vector<std::string>(kStrings);
    bool set_[kStrings] = {};
    std::vector<int32_t> labels_;
};

class Result {
public:
    explicit Result(ldmrt_result *result) noexcept : result_(result) {}
    ~Result() { ldmrt_result_free(result_); }
    Result(Result &&other) noexcept : result_(std::exchange(other.result_, nullptr)) {}
    Result &operator=(Result &&other) noexcept {
        std::swap(result_, other.result_);
        return *this;
    }
    Result(const Result &) = delete;
    Result &operator=(const Result &) = delete;

    int32_t batch() const noexcept { return result_->batch; }
    int32_t height() const noexcept { return result_->height; }
    int32_t width() const noexcept { return result_->width; }
    int32_t channels() const noexcept { return result_->channels; }
    const uint8_t *pixels() const noexcept { return result_->pixels; }   // [batch, height, width, channels]
    const float *images() const noexcept { return result_->images; }
    const float *latents() const noexcept { return result_->latents; }
    std::string warnings() const { return result_->warnings; }
    std::string timings_json() const { return result_->timings_json; }
    std::string png(int32_t index = 0) const {       // a PNG file's bytes, as `ldmrt generate` writes
        const uint8_t *data = nullptr;
        size_t size = 0;
        check(ldmrt_result_png(result_, index, &data, &size));
        return std::string(reinterpret_cast<const char *>(data), size);
    }
    void save(const std::string &path) const { check(ldmrt_result_save(result_, path.c_str())); }
    const ldmrt_result *get() const noexcept { return result_; }

private:
    ldmrt_result *result_;
};

using Progress = std::function<void(int32_t done, int32_t total)>;

class Pipeline {
public:
    explicit Pipeline(const std::string &bundle, const std::string &backend = "",
                      const std::string &backend_options = "") {
        ldmrt_open_options options;
        ldmrt_open_options_init(&options);
        options.backend = backend.empty() ? nullptr : backend.c_str();
        options.backend_options = backend_options.empty() ? nullptr : backend_options.c_str();
        check(ldmrt_open(bundle.c_str(), &options, &pipeline_));
    }
    ~Pipeline() { ldmrt_close(pipeline_); }
    Pipeline(Pipeline &&other) noexcept : pipeline_(std::exchange(other.pipeline_, nullptr)) {}
    Pipeline &operator=(Pipeline &&other) noexcept {
        std::swap(pipeline_, other.pipeline_);
        return *this;
    }
    Pipeline(const Pipeline &) = delete;
    Pipeline &operator=(const Pipeline &) = delete;

    // Safe from several threads at once on one Pipeline.
    Result generate(const Request &request, const Progress &progress = nullptr,
                    const Cancel *cancel = nullptr) const {
        struct Call {
            const Progress *progress;
            std::exception_ptr error;      // an exception from progress stops the call and is rethrown
        } call{&progress, nullptr};
        ldmrt_callbacks callbacks;
        ldmrt_callbacks_init(&callbacks);
        if (progress) {
            callbacks.on_step = [](void *user, int32_t done, int32_t total) -> int32_t {
                Call *self = static_cast<Call *>(user);
                try {                      // no exception may cross the C library: it stops the call
                    (*self->progress)(done, total);
                    return 0;
                } catch (...) {
                    self->error = std::current_exception();
                    return 1;
                }
            };
            callbacks.user_data = &call;
        }
        callbacks.cancel = cancel != nullptr ? cancel->get() : nullptr;
        ldmrt_result *result = nullptr;
        ldmrt_status status = ldmrt_generate(pipeline_, request.get(), &callbacks, &result);
        Result owned(result);
        if (call.error)
            std::rethrow_exception(call.error);
        check(status);
        return owned;
    }
    void set_loras(const std::vector<std::string> &adapters) {
        std::vector<const char *> pointers;
        for (const auto &adapter : adapters)
            pointers.push_back(adapter.c_str());
        check(ldmrt_set_loras(pipeline_, pointers.data(), static_cast<int32_t>(pointers.size())));
    }
    ldmrt_pipeline *get() const noexcept { return pipeline_; }

private:
    ldmrt_pipeline *pipeline_ = nullptr;
};

}  // namespace ldmrt

#endif  // LDMRT_HPP
