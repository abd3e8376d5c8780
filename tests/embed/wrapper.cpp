// wrapper: ldmrt.hpp's ownership and error rules, checked from C++ (tests/test_embed.py).
//   wrapper BUNDLE OUT.png
// Exit 0 when every check holds; each failure names itself on stderr.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <utility>

#include <ldmrt.hpp>

#define CHECK(condition) do { if (!(condition)) { std::cerr << "FAILED: " #condition " (line " << __LINE__ \
    << ")\n"; return 1; } } while (0)

int main(int argc, char **argv) {
    if (argc != 3)
        return 1;
    ldmrt::Pipeline pipeline(argv[1]);

    // A copied request keeps its own strings: the original (and its strings) may be gone.
    auto original = std::make_unique<ldmrt::Request>();
    original->prompt(std::string("a red 7 on a white background")).seed(0);
    ldmrt::Request copy = *original;
    ldmrt::Request assigned;
    assigned = copy;
    original.reset();
    ldmrt::Result first = pipeline.generate(copy);
    ldmrt::Result second = pipeline.generate(assigned);
    const size_t bytes = static_cast<size_t>(first.batch()) * first.height() * first.width() * first.channels();
    CHECK(bytes > 0 && std::memcmp(first.pixels(), second.pixels(), bytes) == 0);
    CHECK(first.png() == second.png() && first.png().compare(1, 3, "PNG") == 0);

    // Moves hand the C handles over; the moved-from objects free nothing twice.
    ldmrt::Result moved = std::move(first);
    ldmrt::Pipeline other = std::move(pipeline);
    moved.save(argv[2]);

    // An exception from progress stops the call at that step and comes out of generate.
    int reached = 0;
    try {
        other.generate(ldmrt::Request().steps(50), [&](int done, int) {
            reached = done;
            if (done == 4)
                throw std::runtime_error("enough");
        });
        CHECK(false);
    } catch (const std::runtime_error &error) {
        CHECK(std::string(error.what()) == "enough" && reached == 4);
    }

    // Errors carry the status and the field.
    try {
        other.generate(ldmrt::Request().steps(0));
        CHECK(false);
    } catch (const ldmrt::Error &error) {
        CHECK(error.status() == LDMRT_ERR_INVALID_ARGUMENT && error.field() == "steps");
        CHECK(std::string(error.status_name()) == "LDMRT_ERR_INVALID_ARGUMENT");
    }
    try {
        ldmrt::Pipeline missing("/nonexistent/bundle");
        CHECK(false);
    } catch (const ldmrt::Error &error) {
        CHECK(error.status() == LDMRT_ERR_BUNDLE && error.field() == "bundle");
    }

    // A cancel token triggered before the call: nothing runs.
    ldmrt::Cancel cancel;
    cancel.trigger();
    try {
        other.generate(ldmrt::Request(), nullptr, &cancel);
        CHECK(false);
    } catch (const ldmrt::Error &error) {
        CHECK(error.status() == LDMRT_ERR_CANCELLED && cancel.triggered());
    }
    std::cout << "wrapper ok\n";
    return 0;
}
