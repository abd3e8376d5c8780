// seven: the README's picture through the C ABI (ldmrt.hpp over ldmrt.h).
//   seven [BUNDLE [OUT.png]]     (defaults: out/digits, out/seven-cpp.png)
#include <iostream>

#include <ldmrt.hpp>

int main(int argc, char **argv) {
    const std::string bundle = argc > 1 ? argv[1] : "out/digits";
    const std::string out = argc > 2 ? argv[2] : "out/seven-cpp.png";
    try {
        ldmrt::Pipeline pipeline(bundle);                       // onnxruntime, as `ldmrt generate`
        ldmrt::Request request;
        request.prompt("a red 7 on a white background").seed(0);
        ldmrt::Result result = pipeline.generate(request, [](int done, int total) {
            std::cerr << "\rdenoising " << done << "/" << total << (done == total ? "\n" : "");
        });
        result.save(out);                                       // the same PNG `ldmrt generate` writes
        std::cout << "wrote " << out << " (" << result.width() << "x" << result.height() << ")\n";
    } catch (const ldmrt::Error &error) {
        std::cerr << error.status_name() << ": " << error.what() << "\n";
        return 2;
    }
}
