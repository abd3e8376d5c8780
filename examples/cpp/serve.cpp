// serve: a tiny HTTP/1.1 image service on one ldmrt::Pipeline (ldmrt.hpp over ldmrt.h), POSIX sockets only.
//   serve BUNDLE [PORT [HOST]]      (defaults: 8080, 127.0.0.1; port 0: the OS picks one)
//   curl -o seven.png 'http://127.0.0.1:8080/generate?prompt=a+red+7+on+a+white+background&seed=3'
// GET /generate?prompt=&seed=&steps=&guidance=&negative_prompt=&sampler=&height=&width= -> image/png,
// GET /health -> "ok"; errors are JSON {"error", "field", "status"}. One detached thread per
// connection, one request per connection: the pipeline serves several threads at once, so no queue.
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include <ldmrt.hpp>

namespace {

constexpr size_t kMaxHead = 16 * 1024;    // request line and headers; longer: 431
constexpr int kTimeoutSeconds = 10;       // a silent (or not reading) client gives its thread back after this
int stop_pipe[2] = {-1, -1};              // self-pipe: the signal handler's only way to reach the accept loop

extern "C" void on_signal(int) {          // async-signal-safe: one write(2), errno kept
    int saved = errno;
    char byte = 1;
    if (write(stop_pipe[1], &byte, 1) < 0) {}   // full (non-blocking) pipe: a stop is already pending
    errno = saved;
}

struct Server {
    std::unique_ptr<ldmrt::Pipeline> pipeline;
    ldmrt::Cancel cancel;                 // triggered at shutdown: running generates stop at their next step
    std::mutex lock;
    std::condition_variable idle;
    int generating = 0;                   // generates in flight; the pipeline is closed only at 0
    bool stopping = false;
};

struct Reply {
    int code;                             // 0: no reply (the client left before sending a request)
    std::string type, body;
};

std::string json_escape(const std::string &text) {
    std::string out;
    for (unsigned char c : text) {
        char escaped[8] = {'\\', static_cast<char>(c), '\0'};
        if (c < 0x20)                     // control characters; UTF-8 bytes pass through as they are
            std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
        out += c == '"' || c == '\\' || c < 0x20 ? escaped : std::string(1, static_cast<char>(c));
    }
    return out;
}

Reply error_reply(int code, const std::string &message, const std::string &field, const char *status) {
    return {code, "application/json", "{\"error\": \"" + json_escape(message) + "\", \"field\": \"" +
                                          json_escape(field) + "\", \"status\": \"" + status + "\"}\n"};
}

// A query key or value: %XX and '+' (a space); false on a broken escape.
bool url_decode(const std::string &text, std::string &out) {
    out.clear();
    for (size_t i = 0; i < text.size(); i++) {
        if (text[i] != '%') {
            out += text[i] == '+' ? ' ' : text[i];
        } else if (i + 2 < text.size() && std::isxdigit(static_cast<unsigned char>(text[i + 1])) &&
                   std::isxdigit(static_cast<unsigned char>(text[i + 2]))) {
            out += static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16));
            i += 2;
        } else {
            return false;
        }
    }
    return true;
}

// Our own query errors take the library's shape: the same JSON, the parameter as the field.
[[noreturn]] void bad_parameter(const std::string &name, const std::string &value, const char *expected) {
    throw ldmrt::Error(LDMRT_ERR_INVALID_ARGUMENT, name + " '" + value + "': expected " + expected, name);
}

template <typename Integer>
Integer parse_integer(const std::string &name, const std::string &value) {
    char *end = nullptr;
    errno = 0;
    long long number = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || std::isspace(static_cast<unsigned char>(value[0])) || *end != '\0' || errno == ERANGE ||
        number < std::numeric_limits<Integer>::min() || number > std::numeric_limits<Integer>::max())
        bad_parameter(name, value, sizeof(Integer) == 4 ? "a 32-bit integer" : "a 64-bit integer");
    return static_cast<Integer>(number);
}

double parse_number(const std::string &name, const std::string &value) {
    char *end = nullptr;
    double number = std::strtod(value.c_str(), &end);
    if (value.empty() || std::isspace(static_cast<unsigned char>(value[0])) || *end != '\0')
        bad_parameter(name, value, "a number");
    return number;                        // NaN, inf: the library says what it accepts
}

// The query over the request's defaults; an unknown name is refused rather than silently dropped.
ldmrt::Request parse_query(const std::string &query) {
    ldmrt::Request request;
    std::istringstream pairs(query);
    for (std::string pair, name, value; std::getline(pairs, pair, '&');) {
        size_t equals = pair.find('=');
        if (pair.empty())
            continue;
        if (!url_decode(pair.substr(0, equals), name) ||
            !url_decode(equals == std::string::npos ? "" : pair.substr(equals + 1), value))
            bad_parameter(pair.substr(0, equals), pair, "%XX escapes of two hex digits");
        if (name == "prompt") request.prompt(value);
        else if (name == "negative_prompt") request.negative_prompt(value);
        else if (name == "sampler") request.sampler(value);
        else if (name == "seed") request.seed(parse_integer<int64_t>(name, value));
        else if (name == "steps") request.steps(parse_integer<int32_t>(name, value));
        else if (name == "guidance") request.guidance(parse_number(name, value));
        else if (name == "height") request.fields().height = parse_integer<int32_t>(name, value);
        else if (name == "width") request.fields().width = parse_integer<int32_t>(name, value);
        else throw ldmrt::Error(LDMRT_ERR_INVALID_ARGUMENT, "unknown query parameter '" + name + "'", name);
    }
    return request;
}

Reply generate(Server &server, const std::string &query) {
    {
        std::lock_guard<std::mutex> hold(server.lock);
        if (server.stopping)
            return error_reply(503, "the server is shutting down", "", ldmrt_status_name(LDMRT_ERR_CANCELLED));
        server.generating++;
    }
    struct Done {                         // on every way out, so that shutdown's wait ends
        Server &server;
        ~Done() {
            std::lock_guard<std::mutex> hold(server.lock);
            if (--server.generating == 0)
                server.idle.notify_all();
        }
    } done{server};
    try {
        ldmrt::Result result = server.pipeline->generate(parse_query(query), nullptr, &server.cancel);
        return {200, "image/png", result.png(0)};
    } catch (const ldmrt::Error &error) {
        ldmrt_status status = error.status();
        int code = status == LDMRT_ERR_INVALID_ARGUMENT ? 400 : status == LDMRT_ERR_CANCELLED ? 503 : 500;
        return error_reply(code, error.what(), error.field(), error.status_name());
    } catch (const std::exception &error) {   // std::bad_alloc and the like: still an answer, not a crash
        return error_reply(500, error.what(), "", ldmrt_status_name(LDMRT_ERR_INTERNAL));
    }
}

// Read the request head and route it (the head's headers are not needed: one GET, no body).
Reply answer(Server &server, int fd) {
    std::string head;
    char buffer[4096];
    size_t end;
    while ((end = head.find("\r\n\r\n")) == std::string::npos && head.size() <= kMaxHead) {
        ssize_t got = recv(fd, buffer, sizeof buffer, 0);
        if (got <= 0)                     // a timeout: 408; the client closed or failed: nobody to answer
            return {got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? 408 : 0, "text/plain", "timed out\n"};
        head.append(buffer, static_cast<size_t>(got));
    }
    if (end == std::string::npos || end > kMaxHead)
        return {431, "text/plain", "request head over 16 KiB\n"};
    std::string line = head.substr(0, head.find("\r\n"));
    size_t space1 = line.find(' '), space2 = line.rfind(' ');
    if (space1 == std::string::npos || space2 == space1 || line.compare(space2 + 1, 7, "HTTP/1.") != 0)
        return {400, "text/plain", "expected: METHOD /path HTTP/1.1\n"};
    std::string method = line.substr(0, space1), target = line.substr(space1 + 1, space2 - space1 - 1);
    size_t question = target.find('?');
    std::string path = target.substr(0, question);
    if (path != "/generate" && path != "/health")
        return {404, "text/plain", "not found; try GET /generate?prompt=... or GET /health\n"};
    if (method != "GET")
        return {405, "text/plain", "only GET\n"};
    if (path == "/health")
        return {200, "text/plain", "ok"};
    return generate(server, question == std::string::npos ? "" : target.substr(question + 1));
}

const char *reason(int code) {
    static const std::pair<int, const char *> kReasons[] = {
        {200, "OK"}, {400, "Bad Request"}, {404, "Not Found"}, {405, "Method Not Allowed"}, {408, "Request Timeout"},
        {431, "Request Header Fields Too Large"}, {503, "Service Unavailable"}};
    for (const auto &[known, text] : kReasons)
        if (known == code)
            return text;
    return "Internal Server Error";
}

void serve_connection(Server &server, int fd) {
    timeval timeout{kTimeoutSeconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    Reply reply = answer(server, fd);
    if (reply.code != 0) {
        std::string out = "HTTP/1.1 " + std::to_string(reply.code) + " " + reason(reply.code) + "\r\nContent-Type: " +
                          reply.type + "\r\nContent-Length: " + std::to_string(reply.body.size()) +
                          (reply.code == 405 ? "\r\nAllow: GET" : "") + "\r\nConnection: close\r\n\r\n" + reply.body;
        ssize_t sent = 0;
        for (size_t at = 0; at < out.size() && sent >= 0; at += static_cast<size_t>(sent))
            sent = send(fd, out.data() + at, out.size() - at, 0);
        // Closing with unread bytes (a POST's body) sends a reset that can destroy the reply still in
        // flight: say we are done, then read briefly until the client closes.
        shutdown(fd, SHUT_WR);
        timeval brief{1, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &brief, sizeof brief);
        char drain[4096];
        for (int rounds = 0; rounds < 64 && recv(fd, drain, sizeof drain, 0) > 0; rounds++) {}
    }
    close(fd);
}

// A listening socket on HOST:PORT (names resolve: "localhost", "::1"); -1 with the reason on stderr.
int listen_on(const char *host, const char *port) {
    addrinfo hints{}, *found = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (int failed = getaddrinfo(host, port, &hints, &found)) {
        std::fprintf(stderr, "serve: %s: %s\n", host, gai_strerror(failed));
        return -1;
    }
    int fd = -1, one = 1;
    for (addrinfo *at = found; at != nullptr && fd < 0; at = at->ai_next) {
        if ((fd = socket(at->ai_family, at->ai_socktype, at->ai_protocol)) < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);   // a restart need not wait out TIME_WAIT
        if (bind(fd, at->ai_addr, at->ai_addrlen) != 0 || listen(fd, 64) != 0) {
            std::fprintf(stderr, "serve: %s port %s: %s\n", host, port, std::strerror(errno));
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    return fd;
}

}  // namespace

int main(int argc, char **argv) {
    const char *port = argc > 2 ? argv[2] : "8080", *host = argc > 3 ? argv[3] : "127.0.0.1";
    char *end = nullptr;
    long number = std::strtol(port, &end, 10);
    if (argc < 2 || argc > 4 || *port == '\0' || *end != '\0' || number < 0 || number > 65535) {
        std::fprintf(stderr, "usage: serve BUNDLE [PORT [HOST]]   (PORT 0..65535, default 8080; HOST 127.0.0.1)\n");
        return 2;
    }
    // SIGINT/SIGTERM stay blocked in every thread but this one's poll: the threads started from now
    // on (the interpreter's, onnxruntime's, each connection's) inherit the mask, so a signal never
    // breaks their recv or a backend's syscall with EINTR, and one during the open waits for the loop.
    sigset_t stops;
    sigemptyset(&stops);
    sigaddset(&stops, SIGINT);
    sigaddset(&stops, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stops, nullptr);
    Server *server = nullptr;             // never freed: a detached thread (a client still sending) may use it at exit
    try {
        server = new Server;
        server->pipeline = std::make_unique<ldmrt::Pipeline>(argv[1]);   // once, before any client; onnxruntime
    } catch (const ldmrt::Error &error) {
        std::fprintf(stderr, "serve: %s: %s\n", error.status_name(), error.what());
        return 2;
    }
    int listener = listen_on(host, port);
    if (listener < 0 || pipe(stop_pipe) != 0)
        return 2;
    for (int fd : {stop_pipe[0], stop_pipe[1], listener})     // the handler must never block; nor must
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);    // accept, when a client left after poll
    struct sigaction action{};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
    signal(SIGPIPE, SIG_IGN);             // a client gone mid-reply is send's error, not the process's death

    sockaddr_storage address{};
    socklen_t size = sizeof address;
    char service[16] = "?";
    getsockname(listener, reinterpret_cast<sockaddr *>(&address), &size);
    getnameinfo(reinterpret_cast<sockaddr *>(&address), size, nullptr, 0, service, sizeof service, NI_NUMERICSERV);
    bool six = std::strchr(host, ':') != nullptr;
    std::printf("listening on http://%s%s%s:%s\n", six ? "[" : "", host, six ? "]" : "", service);
    std::fflush(stdout);

    for (;;) {
        pollfd waits[2] = {{listener, POLLIN, 0}, {stop_pipe[0], POLLIN, 0}};
        pthread_sigmask(SIG_UNBLOCK, &stops, nullptr);   // a pending signal's handler runs here, before poll
        int ready = poll(waits, 2, -1);
        int failure = errno;
        pthread_sigmask(SIG_BLOCK, &stops, nullptr);
        if (ready < 0 && failure == EINTR)
            continue;                     // the signal's byte is in the pipe for the next poll
        if (ready < 0) {
            std::fprintf(stderr, "serve: poll: %s\n", std::strerror(failure));
            break;
        }
        if (waits[1].revents != 0)
            break;
        int fd = waits[0].revents != 0 ? accept(listener, nullptr, nullptr) : -1;
        if (fd < 0)
            continue;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);   // BSDs hand on the listener's flag
        try {
            std::thread(serve_connection, std::ref(*server), fd).detach();
        } catch (const std::system_error &) {   // no thread to be had: drop this client, keep serving
            close(fd);
        }
    }
    // Stop taking work, cancel what runs, close the pipeline once no generate is in flight.
    close(listener);
    std::unique_lock<std::mutex> hold(server->lock);
    server->stopping = true;
    server->cancel.trigger();
    server->idle.wait(hold, [&] { return server->generating == 0; });
    server->pipeline.reset();
    return 0;
}
