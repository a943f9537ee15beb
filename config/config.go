// Package config reads stsmap's configuration file.
//
// The file is YAML and strict, in the manner of prometheus/blackbox_exporter:
// an unknown key, a value of the wrong type, a second YAML document or a
// setting out of range is an error that names the key path and the line, for
// example "config: line 7: dns.timeout: must be greater than 0".
//
// Default is the one place where default values are written down. stsmap runs
// on them when it is given no file, and Parse starts from them and lays the
// keys present in the file over them. config.example.yaml at the repository
// root documents every key; a test keeps it equal to Default.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Config is stsmap's configuration. A Config returned by Default, Parse or
// Load passes Validate; nothing in this package changes it afterwards, so it
// is safe for concurrent reads.
type Config struct {
	// Listen holds the addresses socketmap is served on: "host:port" for
	// TCP, "unix:/absolute/path" for a unix socket (SPEC 1.5).
	Listen    []string
	Socketmap SocketmapConfig
	DNS       DNSConfig
	Fetch     FetchConfig
	Cache     CacheConfig
	Refresh   RefreshConfig
	// Maps holds the settings of socketmap map names, the last field of
	// "socketmap:inet:127.0.0.1:8461:postfix". "*" stands for every name
	// not listed. Read them through MapSettings.
	Maps map[string]MapConfig
	// DANE is "auto" (a DANE level instead of secure for domains whose MX
	// hosts have DNSSEC-authenticated TLSA records, SPEC 7.5) or "off".
	DANE    string
	Metrics MetricsConfig
	Admin   AdminConfig
	Log     LogConfig
}

// AdminConfig holds the admin socket's settings (stsmap cache ...).
type AdminConfig struct {
	// Socket is the unix socket's path (mode 0600): "" means admin.sock
	// beside the policy store, "none" turns it off.
	Socket string
}

// MetricsConfig holds the Prometheus listener's settings.
type MetricsConfig struct {
	// Listen is the host:port of /metrics and /healthz; "" turns them off.
	Listen string
}

// SocketmapConfig holds the settings of the socketmap server (SPEC 1).
type SocketmapConfig struct {
	UnixSocketMode fs.FileMode // permission bits of unix sockets, 0 to 0777
	// UnixSocketOwner and UnixSocketGroup, user and group names or
	// numbers, own the unix sockets; "" leaves them to the process.
	UnixSocketOwner string
	UnixSocketGroup string
	MaxConnections  int           // concurrent client connections
	IdleTimeout     time.Duration // a client connection idle this long is closed
	MaxRequestSize  int           // netstring payload limit in bytes (SPEC 1.1)
}

// DNSConfig holds the settings of the resolver used for TXT and A/AAAA
// lookups (SPEC 3.1, 4.1).
type DNSConfig struct {
	// Nameservers are "ip:port" addresses ("192.0.2.53:53",
	// "[2001:db8::53]:53"). Empty means the nameservers of
	// /etc/resolv.conf. The file may omit the port; Parse adds ":53".
	Nameservers []string
	Timeout     time.Duration // one query to one server
}

// FetchConfig bounds policy discovery in time (SPEC 4.6).
type FetchConfig struct {
	FirstContactTimeout time.Duration // a lookup Postfix waits on; at most Timeout
	Timeout             time.Duration // a discovery that goes on in the background
}

// CacheConfig holds the settings of the policy cache (SPEC 6) and of the
// store that keeps its policies across restarts.
type CacheConfig struct {
	Size        int           // policies kept in memory (LRU)
	NegativeTTL time.Duration // how long "no policy" is remembered (SPEC 6.6); 0 disables
	// Store says where policies persist: "bolt" (an embedded file, Path),
	// "redis" (a server a fleet shares, RedisURL) or "memory" (nowhere: a
	// restart forgets them).
	Store string
	// Path is the bolt file, absolute; "" stands for a default that
	// depends on the environment. Read it through StorePath.
	Path string
	// RedisURL is the Redis server of store "redis", in the form
	// go-redis's ParseURL reads: redis://[user:password@]host[:port][/db],
	// rediss://... (TLS) or unix:///path. It may hold a password: never
	// log it whole (url.URL.Redacted hides the password).
	RedisURL string
	// RedisPrefix starts every Redis key, so that several fleets can share
	// one server: 1 to 64 bytes of printable ASCII without spaces.
	RedisPrefix string
}

// RefreshConfig holds the settings of the background refresher (SPEC 6.4,
// 6.5).
type RefreshConfig struct {
	// Interval is how often at most the _mta-sts TXT id of a cached
	// domain is checked again; 1m to 24h.
	Interval time.Duration
	// RenewBefore is how long before a policy expires it is fetched over
	// HTTPS when its TXT record cannot be read or has vanished (SPEC 6.4,
	// RFC 8461 section 10.2). 0 means the smaller of 24h and half the
	// policy's max_age; at most 720h.
	RenewBefore time.Duration
	Concurrency int // refreshes at once, 1 to 256
	// IdleAfter is how long a domain no lookup asked for is kept and
	// refreshed before it is dropped; at least 1h and longer than
	// Interval.
	IdleAfter time.Duration
}

// MapConfig holds the settings one map name changes. A nil field takes its
// value from the map "*".
type MapConfig struct {
	StrictTesting *bool // answer "testing" policies like "enforce" (SPEC 7.2)
	Servername    *bool // add servername=hostname to answers (SPEC 7.4, Postfix 3.4+)
	TLSRPT        *bool // add the TLSRPT attributes to answers (SPEC 7.3, Postfix 3.10+)
}

// MapSettings are the settings in force for one map name. main converts
// them to policymap.Settings, so the two types keep the same fields in the
// same order.
type MapSettings struct {
	StrictTesting bool
	Servername    bool
	TLSRPT        bool
}

// LogConfig holds the settings of the logger.
type LogConfig struct {
	Level  slog.Level // slog.LevelDebug, LevelInfo, LevelWarn or LevelError
	Format string     // "text" or "json"
}

// builtinMapSettings are the settings of "*" when the file changes none.
var builtinMapSettings = MapSettings{StrictTesting: false, Servername: true, TLSRPT: false}

// Default returns the configuration stsmap runs on without a file. Every
// call returns a new Config.
func Default() *Config {
	return &Config{
		Listen: []string{"127.0.0.1:8461"},
		Socketmap: SocketmapConfig{
			UnixSocketMode: 0o666,
			MaxConnections: 1000,
			IdleTimeout:    60 * time.Second,
			MaxRequestSize: 10000,
		},
		DNS: DNSConfig{
			Nameservers: nil,
			Timeout:     2 * time.Second,
		},
		Fetch: FetchConfig{
			FirstContactTimeout: 5 * time.Second,
			Timeout:             30 * time.Second,
		},
		Cache: CacheConfig{
			Size:        100000,
			NegativeTTL: 15 * time.Minute,
			Store:       "bolt",
			Path:        "",
			RedisURL:    "",
			RedisPrefix: "stsmap:",
		},
		Refresh: RefreshConfig{
			Interval:    time.Hour,
			RenewBefore: 0,
			Concurrency: 8,
			IdleAfter:   30 * 24 * time.Hour,
		},
		Maps: map[string]MapConfig{
			"*": {
				StrictTesting: new(builtinMapSettings.StrictTesting),
				Servername:    new(builtinMapSettings.Servername),
				TLSRPT:        new(builtinMapSettings.TLSRPT),
			},
		},
		DANE:    "auto",
		Metrics: MetricsConfig{Listen: "127.0.0.1:8462"},
		Log: LogConfig{
			Level:  slog.LevelInfo,
			Format: "text",
		},
	}
}

// MapSettings returns the settings of the map name: its own MapConfig laid
// over that of "*". It reads Maps on every call, two map lookups and no
// allocation, so it stays right for a Config changed after Parse.
func (c *Config) MapSettings(name string) MapSettings {
	s := c.Maps["*"].over(builtinMapSettings)
	if name != "*" {
		s = c.Maps[name].over(s)
	}
	return s
}

func (m MapConfig) over(s MapSettings) MapSettings {
	if m.StrictTesting != nil {
		s.StrictTesting = *m.StrictTesting
	}
	if m.Servername != nil {
		s.Servername = *m.Servername
	}
	if m.TLSRPT != nil {
		s.TLSRPT = *m.TLSRPT
	}
	return s
}

// Load reads and parses the configuration file at path. Its errors name the
// file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return parse(data, path)
}

// Parse parses a configuration file's contents: the defaults of Default, then
// the keys present in data, then Validate. An empty document, or one holding
// only comments, gives the defaults. The error reports the problems found,
// one per line of its text in the order of the file, at most 20 of them;
// ranges are checked once the whole file reads cleanly.
func Parse(data []byte) (*Config, error) {
	return parse(data, "")
}

func parse(data []byte, file string) (*Config, error) {
	c, errs := decode(data)
	if len(errs) > 0 {
		for _, e := range errs {
			e.file = file
		}
		return nil, join(errs)
	}
	return c, nil
}

// Validate reports the settings of c that are out of range. Its errors name
// key paths but no lines; Parse adds those.
func (c *Config) Validate() error {
	return join(c.validate())
}

// configError is one problem in a configuration.
type configError struct {
	file string // set by Load
	line int    // 0 when not known
	path string // key path such as "dns.timeout" or "listen[1]"; empty when msg says where
	msg  string
	// at lists the key paths whose line locates a problem Validate found,
	// best first.
	at []string
}

func (e *configError) Error() string {
	var b strings.Builder
	b.WriteString("config: ")
	if e.file != "" {
		b.WriteString(e.file + ": ")
	}
	if e.line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.line)
	}
	if e.path != "" {
		b.WriteString(e.path + ": ")
	}
	b.WriteString(e.msg)
	return b.String()
}

// maxErrors bounds the problems reported at once; past a few, more help
// nobody.
const maxErrors = 20

// join orders errs by line and joins at most maxErrors of them; it returns
// nil for none.
func join(errs []*configError) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	slices.SortStableFunc(errs, func(a, b *configError) int { return cmp.Compare(a.line, b.line) })
	var list []error
	for _, e := range errs[:min(len(errs), maxErrors)] {
		list = append(list, e)
	}
	if n := len(errs) - maxErrors; n > 0 {
		list = append(list, fmt.Errorf("config: and %d more problems", n))
	}
	return errors.Join(list...)
}

// validate returns every setting out of range, with key paths but no lines.
func (c *Config) validate() []*configError {
	var errs []*configError
	add := func(path, format string, args ...any) *configError {
		e := &configError{path: path, msg: fmt.Sprintf(format, args...), at: []string{path}}
		errs = append(errs, e)
		return e
	}

	if len(c.Listen) == 0 {
		add("listen", "at least one address")
	}
	seen := make(map[string]int)
	for i, addr := range c.Listen {
		path := fmt.Sprintf("listen[%d]", i)
		if msg := checkListen(addr); msg != "" {
			add(path, "%s", msg)
		} else if j, ok := seen[addr]; ok {
			add(path, "%q repeats listen[%d]", addr, j)
		}
		seen[addr] = i
	}

	s := c.Socketmap
	for _, kv := range [][2]string{{"socketmap.unix_socket_owner", s.UnixSocketOwner}, {"socketmap.unix_socket_group", s.UnixSocketGroup}} {
		if strings.ContainsFunc(kv[1], func(r rune) bool { return r <= ' ' || r == ':' || r > '~' }) || len(kv[1]) > 64 {
			add(kv[0], "must be a user or group name or number, not %q", kv[1])
		}
	}
	if s.UnixSocketMode&^0o777 != 0 {
		add("socketmap.unix_socket_mode", "must be between 0000 and 0777, not %#o", uint32(s.UnixSocketMode))
	}
	if s.MaxConnections < 1 {
		add("socketmap.max_connections", "must be at least 1")
	}
	if s.IdleTimeout <= 0 {
		add("socketmap.idle_timeout", "must be greater than 0")
	}
	if s.MaxRequestSize < 256 || s.MaxRequestSize > 1<<20 {
		add("socketmap.max_request_size", "must be between 256 and 1048576 bytes, not %d", s.MaxRequestSize)
	}

	for i, ns := range c.DNS.Nameservers {
		if ap, err := netip.ParseAddrPort(ns); err != nil || ap.Port() == 0 {
			add(fmt.Sprintf("dns.nameservers[%d]", i),
				`%q is not an IP address with an optional port, e.g. "192.0.2.53" or "[2001:db8::53]:53" (a host name is not allowed)`, ns)
		}
	}
	checkTimeout := func(path string, d, limit time.Duration) {
		if d <= 0 {
			add(path, "must be greater than 0")
		} else if d > limit {
			add(path, "must be at most %v, not %v", limit, d)
		}
	}
	checkTimeout("dns.timeout", c.DNS.Timeout, 30*time.Second)
	checkTimeout("fetch.timeout", c.Fetch.Timeout, 5*time.Minute)
	if f := c.Fetch; f.FirstContactTimeout <= 0 {
		add("fetch.first_contact_timeout", "must be greater than 0")
	} else if f.Timeout > 0 && f.FirstContactTimeout > f.Timeout {
		e := add("fetch.first_contact_timeout", "must not be longer than fetch.timeout (%v), not %v", f.Timeout, f.FirstContactTimeout)
		e.at = append(e.at, "fetch.timeout") // the file may set only fetch.timeout
	}

	cc := c.Cache
	if cc.Size < 1 {
		add("cache.size", "must be at least 1")
	}
	if cc.NegativeTTL < 0 {
		add("cache.negative_ttl", "must not be negative (0 disables it)")
	}
	switch cc.Store {
	case "bolt", "redis", "memory":
	default:
		add("cache.store", "must be bolt, redis or memory, not %q", cc.Store)
	}
	if cc.Path != "" && !filepath.IsAbs(cc.Path) {
		add("cache.path", `must be an absolute path, not %q ("" picks a default)`, cc.Path)
	}
	switch {
	case cc.RedisURL != "" && cc.Store != "redis":
		// Most likely a misspelt store: the fleet would not share policies.
		add("cache.redis_url", "is set, but cache.store is %q; set cache.store: redis to use it, or remove cache.redis_url", cc.Store)
	case cc.Store == "redis" && cc.RedisURL == "":
		e := add("cache.redis_url", `is required with cache.store: redis, e.g. "redis://localhost:6379/0"`)
		e.at = []string{"cache.store", "cache.redis_url"}
	case cc.Store == "redis":
		if msg := checkRedisURL(cc.RedisURL); msg != "" {
			add("cache.redis_url", "%s", msg)
		}
	}
	if msg := checkRedisPrefix(cc.RedisPrefix); msg != "" {
		add("cache.redis_prefix", "%s", msg)
	}

	r := c.Refresh
	intervalOK := false
	switch {
	case r.Interval < time.Minute:
		add("refresh.interval", "must be at least 1m0s, not %v", r.Interval)
	case r.Interval > 24*time.Hour:
		add("refresh.interval", "must be at most 24h0m0s, not %v", r.Interval)
	default:
		intervalOK = true
	}
	switch {
	case r.RenewBefore < 0:
		add("refresh.renew_before", "must not be negative (0 means the smaller of 24h and half the policy's max_age)")
	case r.RenewBefore > 30*24*time.Hour:
		add("refresh.renew_before", "must be at most 720h0m0s, not %v", r.RenewBefore)
	}
	if r.Concurrency < 1 || r.Concurrency > 256 {
		add("refresh.concurrency", "must be between 1 and 256, not %d", r.Concurrency)
	}
	switch {
	case r.IdleAfter < time.Hour:
		add("refresh.idle_after", "must be at least 1h0m0s, not %v", r.IdleAfter)
	case intervalOK && r.IdleAfter <= r.Interval:
		add("refresh.idle_after", "must be longer than refresh.interval (%v), not %v", r.Interval, r.IdleAfter)
	}

	for _, name := range slices.Sorted(maps.Keys(c.Maps)) {
		var msg string
		switch {
		case name == "":
			msg = "a map name must not be empty"
		case strings.IndexFunc(name, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
			msg = fmt.Sprintf("map name %q must not contain white space or control characters", name)
		default:
			continue
		}
		e := add("maps", "%s", msg)
		e.at = []string{"maps." + name, "maps"}
	}

	switch c.Log.Level {
	case slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError:
	default:
		add("log.level", "must be debug, info, warn or error, not %v", c.Log.Level)
	}
	if c.Metrics.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Metrics.Listen); err != nil || port == "" {
			add("metrics.listen", "must be host:port or empty, not %q", c.Metrics.Listen)
		}
	}
	if a := c.Admin.Socket; a != "" && a != "none" && !filepath.IsAbs(a) {
		add("admin.socket", "must be an absolute path, \"none\" or empty, not %q", a)
	}
	if c.DANE != "auto" && c.DANE != "off" {
		add("dane", "must be auto or off, not %q", c.DANE)
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		add("log.format", "must be text or json, not %q", c.Log.Format)
	}
	return errs
}

// checkRedisURL returns what is wrong with a Redis URL, or "". It accepts
// what go-redis's ParseURL accepts, except that a TCP URL must name its host
// (go-redis would quietly take localhost) and a unix URL must have no host
// (go-redis would ignore it, so "unix://run/redis.sock" would mean
// /redis.sock). Query options are left to go-redis.
//
// The URL may hold a password, and a malformed one may hold it anywhere, so
// the messages repeat no part of it but the scheme.
func checkRedisURL(s string) string {
	const forms = "redis://[user:password@]host[:port][/db], rediss://... or unix:///path"
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return "is not a valid URL; write " + forms + ", with special characters percent-encoded (/ as %2F)"
	case u.Opaque != "" || u.Scheme != "unix" && !strings.HasPrefix(s[len(u.Scheme):], "://"):
		// Without "//", what url.Parse takes for the scheme may be the
		// user name of a URL that lacks one.
		return "must have the form " + forms
	}
	switch u.Scheme {
	case "redis", "rediss":
		if u.Hostname() == "" {
			return "names no host; write " + forms
		}
		if p := u.Port(); p != "" {
			if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
				return "has a port out of range; ports go from 1 to 65535"
			}
		}
		if db := strings.Trim(u.Path, "/"); db != "" && strings.Trim(db, "0123456789") != "" {
			return "may end only in a database number such as /0"
		}
	case "unix":
		if u.Host != "" || !strings.HasPrefix(u.Path, "/") {
			return "must name an absolute socket path after unix://, e.g. unix:///run/redis/redis.sock"
		}
	default:
		return fmt.Sprintf("has the scheme %q; write %s", u.Scheme, forms)
	}
	return ""
}

// checkRedisPrefix returns what is wrong with a Redis key prefix, or "".
func checkRedisPrefix(s string) string {
	switch {
	case s == "":
		return "must not be empty"
	case len(s) > 64:
		return fmt.Sprintf("must be at most 64 bytes, not %d", len(s))
	case strings.IndexFunc(s, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0:
		return fmt.Sprintf("must be printable ASCII without spaces, not %q", s)
	}
	return ""
}

// checkListen returns what is wrong with a listen address, or "".
func checkListen(addr string) string {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !filepath.IsAbs(path) {
			return fmt.Sprintf("unix socket path must be absolute, e.g. unix:/run/stsmap/stsmap.sock, not %q", addr)
		}
		return ""
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Sprintf(`%q is neither "host:port" nor "unix:/path"`, addr)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Sprintf("port must be a number from 1 to 65535, not %q", port)
	}
	return ""
}
