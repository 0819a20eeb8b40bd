// Parsing of operator attributes. MXNet hands every attribute over as a string; these helpers
// turn them into typed values and throw AttrError naming the key and the bad value, which the
// registration layer reports through MX_ERROR_MSG (MXNet then raises MXNetError in Python).
#pragma once

#include <cerrno>
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace qo {

using AttrMap = std::unordered_map<std::string, std::string>;

struct AttrError : std::runtime_error {
  explicit AttrError(const std::string& msg) : std::runtime_error(msg) {}
};

/*! \brief Reject keys this operator does not know (typos would otherwise be silent).
 *  Keys MXNet adds itself (`__...__`) are allowed. */
inline void check_known_keys(const std::string& op, const AttrMap& attrs,
                             std::initializer_list<const char*> known) {
  for (const auto& kv : attrs) {
    if (kv.first.rfind("__", 0) == 0) continue;
    bool ok = false;
    for (const char* k : known) ok = ok || kv.first == k;
    if (!ok) throw AttrError(op + ": unknown attribute '" + kv.first + "'");
  }
}

inline const std::string* find_attr(const AttrMap& attrs, const char* key) {
  auto it = attrs.find(key);
  return it == attrs.end() ? nullptr : &it->second;
}

inline long long attr_int(const std::string& op, const AttrMap& attrs, const char* key,
                          long long dflt, long long lo, long long hi) {
  const std::string* v = find_attr(attrs, key);
  if (!v) return dflt;
  errno = 0;
  char* end = nullptr;
  long long r = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || errno != 0 || *end != '\0')
    throw AttrError(op + ": attribute '" + key + "' must be an integer, got '" + *v + "'");
  if (r < lo || r > hi)
    throw AttrError(op + ": attribute '" + key + "' = " + *v + " is out of range [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return r;
}

inline float attr_float(const std::string& op, const AttrMap& attrs, const char* key,
                        float dflt, float lo, float hi) {
  const std::string* v = find_attr(attrs, key);
  if (!v) return dflt;
  errno = 0;
  char* end = nullptr;
  float r = std::strtof(v->c_str(), &end);
  if (v->empty() || errno != 0 || *end != '\0' || !(r >= lo && r <= hi))
    throw AttrError(op + ": attribute '" + key + "' must be a number in [" + std::to_string(lo) +
                    ", " + std::to_string(hi) + "], got '" + *v + "'");
  return r;
}

inline bool attr_bool(const std::string& op, const AttrMap& attrs, const char* key, bool dflt) {
  const std::string* v = find_attr(attrs, key);
  if (!v) return dflt;
  if (*v == "True" || *v == "true" || *v == "1") return true;
  if (*v == "False" || *v == "false" || *v == "0") return false;
  throw AttrError(op + ": attribute '" + key + "' must be True or False, got '" + *v + "'");
}

/*! \brief One of a fixed set of strings; returns its index. */
inline int attr_choice(const std::string& op, const AttrMap& attrs, const char* key,
                       std::initializer_list<const char*> choices, int dflt) {
  const std::string* v = find_attr(attrs, key);
  if (!v) return dflt;
  int i = 0;
  std::string names;
  for (const char* c : choices) {
    if (*v == c) return i;
    names += (i ? ", " : "") + std::string(c);
    ++i;
  }
  throw AttrError(op + ": attribute '" + key + "' must be one of {" + names + "}, got '" + *v +
                  "'");
}

}  // namespace qo
