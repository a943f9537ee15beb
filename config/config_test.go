package config

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestExampleIsDefault(t *testing.T) {
	got, err := Load("../config.example.yaml")
	if err != nil {
		t.Fatalf("Load(config.example.yaml): %v", err)
	}
	if want := Default(); !reflect.DeepEqual(got, want) {
		t.Errorf("config.example.yaml parses to\n%+v\nwant Default()\n%+v", got, want)
	}
}

func TestDefaultIsValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Errorf("Default().Validate() = %v, want nil", err)
	}
}

// The defaults SPEC names: TestExampleIsDefault keeps the example equal to
// Default, this keeps Default equal to SPEC.
func TestDefaultsFollowSpec(t *testing.T) {
	c := Default()
	if got, want := c.Listen, []string{"127.0.0.1:8461"}; !slices.Equal(got, want) {
		t.Errorf("Listen = %q, want %q (SPEC 1.5)", got, want)
	}
	if got, want := c.Socketmap.MaxRequestSize, 10000; got != want {
		t.Errorf("Socketmap.MaxRequestSize = %d, want %d (SPEC 1.1)", got, want)
	}
	if got, want := c.Fetch.FirstContactTimeout, 5*time.Second; got != want {
		t.Errorf("Fetch.FirstContactTimeout = %v, want %v (SPEC 4.6)", got, want)
	}
	if got := c.Fetch.Timeout; got < 30*time.Second || got > 60*time.Second {
		t.Errorf("Fetch.Timeout = %v, want 30s to 60s (SPEC 4.6)", got)
	}
	// Strict testing and TLSRPT attributes are off, servername on, until a
	// map name switches them (SPEC 7.2, 7.3, 7.4).
	if got, want := c.MapSettings("postfix"), (MapSettings{StrictTesting: false, Servername: true, TLSRPT: false}); got != want {
		t.Errorf("MapSettings(postfix) = %+v, want %+v (SPEC 7.2-7.4)", got, want)
	}
}

func TestEmptyIsDefault(t *testing.T) {
	for _, input := range []string{
		"",
		"\n\n",
		"# only a comment\n",
		"---\n",
		"--- # one document\n...\n",
		"~\n",
		"socketmap:\ndns:\nfetch:\ncache:\nrefresh:\nmaps:\nlog:\n", // empty sections
		"maps: {}\n",
	} {
		got, err := Parse([]byte(input))
		if err != nil {
			t.Errorf("Parse(%q): %v", input, err)
			continue
		}
		if want := Default(); !reflect.DeepEqual(got, want) {
			t.Errorf("Parse(%q) = %+v, want Default() %+v", input, got, want)
		}
	}
}

func TestOverrides(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  func(c *Config) // applied to Default()
	}{
		{"listen", `listen: ["[::1]:10025", "unix:/var/spool/postfix/private/stsmap", ":8461"]`, func(c *Config) {
			c.Listen = []string{"[::1]:10025", "unix:/var/spool/postfix/private/stsmap", ":8461"}
		}},
		{"listen block style", "listen:\n  - 127.0.0.1:1\n  - localhost:2\n", func(c *Config) {
			c.Listen = []string{"127.0.0.1:1", "localhost:2"}
		}},
		{"unix_socket owner and group", `socketmap: {unix_socket_owner: stsmap, unix_socket_group: "105"}`, func(c *Config) {
			c.Socketmap.UnixSocketOwner, c.Socketmap.UnixSocketGroup = "stsmap", "105"
		}},
		{"unix_socket_mode quoted", `socketmap: {unix_socket_mode: "0660"}`, func(c *Config) {
			c.Socketmap.UnixSocketMode = 0o660
		}},
		{"unix_socket_mode unquoted", `socketmap: {unix_socket_mode: 0600}`, func(c *Config) {
			c.Socketmap.UnixSocketMode = 0o600
		}},
		{"unix_socket_mode without leading 0", `socketmap: {unix_socket_mode: 640}`, func(c *Config) {
			c.Socketmap.UnixSocketMode = 0o640
		}},
		{"unix_socket_mode 0o", `socketmap: {unix_socket_mode: 0o640}`, func(c *Config) {
			c.Socketmap.UnixSocketMode = 0o640
		}},
		{"unix_socket_mode zero", `socketmap: {unix_socket_mode: "0000"}`, func(c *Config) {
			c.Socketmap.UnixSocketMode = 0
		}},
		{"max_connections", `socketmap: {max_connections: 5}`, func(c *Config) {
			c.Socketmap.MaxConnections = 5
		}},
		{"idle_timeout", `socketmap: {idle_timeout: 1m30s}`, func(c *Config) {
			c.Socketmap.IdleTimeout = 90 * time.Second
		}},
		{"max_request_size minimum", `socketmap: {max_request_size: 256}`, func(c *Config) {
			c.Socketmap.MaxRequestSize = 256
		}},
		{"max_request_size maximum", `socketmap: {max_request_size: 1048576}`, func(c *Config) {
			c.Socketmap.MaxRequestSize = 1 << 20
		}},
		{"nameservers", `dns: {nameservers: ["192.0.2.53", "192.0.2.54:5353", "2001:db8::53", "[2001:db8::54]", "[2001:db8::55]:5353"]}`, func(c *Config) {
			c.DNS.Nameservers = []string{"192.0.2.53:53", "192.0.2.54:5353", "[2001:db8::53]:53", "[2001:db8::54]:53", "[2001:db8::55]:5353"}
		}},
		{"nameservers null", "dns:\n  nameservers:\n", func(c *Config) {}},
		{"dns timeout", `dns: {timeout: 30s}`, func(c *Config) {
			c.DNS.Timeout = 30 * time.Second
		}},
		{"first_contact_timeout", `fetch: {first_contact_timeout: 500ms}`, func(c *Config) {
			c.Fetch.FirstContactTimeout = 500 * time.Millisecond
		}},
		{"first_contact_timeout equal to timeout", `fetch: {first_contact_timeout: 5m, timeout: 5m}`, func(c *Config) {
			c.Fetch.FirstContactTimeout = 5 * time.Minute
			c.Fetch.Timeout = 5 * time.Minute
		}},
		{"fetch timeout", `fetch: {timeout: 1m}`, func(c *Config) {
			c.Fetch.Timeout = time.Minute
		}},
		{"cache size", `cache: {size: 1}`, func(c *Config) {
			c.Cache.Size = 1
		}},
		{"negative_ttl", `cache: {negative_ttl: 1h}`, func(c *Config) {
			c.Cache.NegativeTTL = time.Hour
		}},
		{"negative_ttl bare 0 disables", `cache: {negative_ttl: 0}`, func(c *Config) {
			c.Cache.NegativeTTL = 0
		}},
		{"store memory", `cache: {store: memory}`, func(c *Config) {
			c.Cache.Store = "memory"
		}},
		{"store bolt with path", `cache: {store: bolt, path: /srv/stsmap/policies.db}`, func(c *Config) {
			c.Cache.Path = "/srv/stsmap/policies.db"
		}},
		{"store redis", "cache:\n  store: redis\n  redis_url: redis://stsmap:pa%40ss@redis.example.net:6380/2\n  redis_prefix: \"fleet-a:\"\n", func(c *Config) {
			c.Cache.Store = "redis"
			c.Cache.RedisURL = "redis://stsmap:pa%40ss@redis.example.net:6380/2"
			c.Cache.RedisPrefix = "fleet-a:"
		}},
		{"store redis over TLS to IPv6 without port or db", `cache: {store: redis, redis_url: "rediss://[2001:db8::6379]"}`, func(c *Config) {
			c.Cache.Store = "redis"
			c.Cache.RedisURL = "rediss://[2001:db8::6379]"
		}},
		{"store redis over a unix socket", `cache: {store: redis, redis_url: "unix:///run/redis/redis.sock?db=1"}`, func(c *Config) {
			c.Cache.Store = "redis"
			c.Cache.RedisURL = "unix:///run/redis/redis.sock?db=1"
		}},
		{"redis_prefix of 64 bytes", "cache: {redis_prefix: " + strings.Repeat("k", 64) + "}", func(c *Config) {
			c.Cache.RedisPrefix = strings.Repeat("k", 64)
		}},
		{"refresh", "refresh:\n  interval: 15m\n  renew_before: 48h\n  concurrency: 32\n  idle_after: 168h\n", func(c *Config) {
			c.Refresh = RefreshConfig{Interval: 15 * time.Minute, RenewBefore: 48 * time.Hour, Concurrency: 32, IdleAfter: 168 * time.Hour}
		}},
		{"refresh lower limits", `refresh: {interval: 1m, renew_before: 0, concurrency: 1, idle_after: 1h}`, func(c *Config) {
			c.Refresh = RefreshConfig{Interval: time.Minute, RenewBefore: 0, Concurrency: 1, IdleAfter: time.Hour}
		}},
		{"refresh upper limits", `refresh: {interval: 24h, renew_before: 720h, concurrency: 256, idle_after: 24h1s}`, func(c *Config) {
			c.Refresh = RefreshConfig{Interval: 24 * time.Hour, RenewBefore: 720 * time.Hour, Concurrency: 256, IdleAfter: 24*time.Hour + time.Second}
		}},
		{"star map", `maps: {"*": {strict_testing: true}}`, func(c *Config) {
			c.Maps["*"] = MapConfig{StrictTesting: new(true), Servername: new(true), TLSRPT: new(false)}
		}},
		{"star map tlsrpt", `maps: {"*": {tlsrpt: true}}`, func(c *Config) {
			c.Maps["*"] = MapConfig{StrictTesting: new(false), Servername: new(true), TLSRPT: new(true)}
		}},
		{"named map tlsrpt", `maps: {postfix310: {tlsrpt: true}}`, func(c *Config) {
			c.Maps["postfix310"] = MapConfig{TLSRPT: new(true)}
		}},
		{"named map", `maps: {postfix: {servername: false}}`, func(c *Config) {
			c.Maps["postfix"] = MapConfig{Servername: new(false)}
		}},
		{"named map without settings", "maps:\n  postfix:\n", func(c *Config) {
			c.Maps["postfix"] = MapConfig{}
		}},
		{"map name that YAML reads as a number", `maps: {1: {strict_testing: true}}`, func(c *Config) {
			c.Maps["1"] = MapConfig{StrictTesting: new(true)}
		}},
		{"log level", `log: {level: debug}`, func(c *Config) {
			c.Log.Level = slog.LevelDebug
		}},
		{"log level warn", `log: {level: warn}`, func(c *Config) {
			c.Log.Level = slog.LevelWarn
		}},
		{"log level error", `log: {level: error}`, func(c *Config) {
			c.Log.Level = slog.LevelError
		}},
		{"log format", `log: {format: json}`, func(c *Config) {
			c.Log.Format = "json"
		}},
		{"anchors", "dns: {timeout: &t 3s}\nfetch: {first_contact_timeout: *t}\n", func(c *Config) {
			c.DNS.Timeout = 3 * time.Second
			c.Fetch.FirstContactTimeout = 3 * time.Second
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.input))
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.input, err)
			}
			want := Default()
			tt.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse(%q)\n got %+v\nwant %+v", tt.input, got, want)
			}
		})
	}
}

func TestMergeKey(t *testing.T) {
	c, err := Parse([]byte("cache: {<<: {size: 7}, negative_ttl: 1m}\n"))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := Default().Cache
	want.Size, want.NegativeTTL = 7, time.Minute
	if got := c.Cache; got != want {
		t.Errorf("Cache = %+v, want %+v", got, want)
	}
}

func TestMapSettings(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  map[string]MapSettings // map name -> settings
	}{
		{"defaults", "", map[string]MapSettings{
			"*":       {StrictTesting: false, Servername: true, TLSRPT: false},
			"postfix": {StrictTesting: false, Servername: true, TLSRPT: false},
			"":        {StrictTesting: false, Servername: true, TLSRPT: false},
		}},
		{"named map inherits star", "maps:\n  postfix: {strict_testing: true}\n", map[string]MapSettings{
			"postfix": {StrictTesting: true, Servername: true},
			"other":   {StrictTesting: false, Servername: true},
			"*":       {StrictTesting: false, Servername: true},
		}},
		{"star override reaches unnamed and named maps", "maps:\n  \"*\": {servername: false}\n  postfix: {strict_testing: true}\n", map[string]MapSettings{
			"postfix": {StrictTesting: true, Servername: false},
			"other":   {StrictTesting: false, Servername: false},
			"*":       {StrictTesting: false, Servername: false},
		}},
		{"named map overrides star", "maps:\n  \"*\": {strict_testing: true, servername: false}\n  old: {strict_testing: false, servername: true}\n", map[string]MapSettings{
			"old":   {StrictTesting: false, Servername: true},
			"other": {StrictTesting: true, Servername: false},
		}},
		{"named map without settings", "maps:\n  postfix:\n  \"*\": {strict_testing: true}\n", map[string]MapSettings{
			"postfix": {StrictTesting: true, Servername: true},
		}},
		{"tlsrpt for one map name", "maps:\n  postfix310: {tlsrpt: true}\n", map[string]MapSettings{
			"postfix310": {StrictTesting: false, Servername: true, TLSRPT: true},
			"postfix":    {StrictTesting: false, Servername: true, TLSRPT: false},
			"*":          {StrictTesting: false, Servername: true, TLSRPT: false},
		}},
		{"tlsrpt inherited from star", "maps:\n  \"*\": {tlsrpt: true}\n  postfix: {strict_testing: true}\n", map[string]MapSettings{
			"postfix": {StrictTesting: true, Servername: true, TLSRPT: true},
			"other":   {StrictTesting: false, Servername: true, TLSRPT: true},
		}},
		{"tlsrpt overridden for an old Postfix", "maps:\n  \"*\": {tlsrpt: true}\n  postfix39: {tlsrpt: false}\n", map[string]MapSettings{
			"postfix39": {StrictTesting: false, Servername: true, TLSRPT: false},
			"other":     {StrictTesting: false, Servername: true, TLSRPT: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.input))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			for name, want := range tt.want {
				if got := c.MapSettings(name); got != want {
					t.Errorf("MapSettings(%q) = %+v, want %+v", name, got, want)
				}
			}
		})
	}
}

// MapSettings reads Maps on every call, so a Config built or changed in code
// (as tests of other packages do) answers with what it holds.
func TestMapSettingsOfChangedConfig(t *testing.T) {
	c := Default()
	c.Maps["postfix"] = MapConfig{StrictTesting: new(true)}
	if got, want := c.MapSettings("postfix"), (MapSettings{StrictTesting: true, Servername: true}); got != want {
		t.Errorf("MapSettings(postfix) = %+v, want %+v", got, want)
	}
	var zero Config
	if got, want := zero.MapSettings("postfix"), builtinMapSettings; got != want {
		t.Errorf("Config{}.MapSettings(postfix) = %+v, want %+v", got, want)
	}
}

// MapSettings is asked on every lookup; its doc promises no allocation.
func TestMapSettingsDoesNotAllocate(t *testing.T) {
	c, err := Parse([]byte("maps:\n  postfix: {strict_testing: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"postfix", "unknown", "*"} {
		if allocs := testing.AllocsPerRun(100, func() { c.MapSettings(name) }); allocs != 0 {
			t.Errorf("MapSettings(%q): %v allocations, want 0", name, allocs)
		}
	}
}

// rejected maps each file in testdata to the text its error must contain:
// the line, the key path and the problem.
var rejected = map[string]string{
	"bad_duration.yaml":                     `line 3: socketmap.idle_timeout: "1 minute" is not a duration`,
	"bad_log_format.yaml":                   `line 3: log.format: must be text or json, not "logfmt"`,
	"bad_log_level.yaml":                    `line 4: log.level: must be debug, info, warn or error, not "verbose"`,
	"bad_map_name.yaml":                     `line 4: maps: map name "post fix" must not contain white space`,
	"bad_mode.yaml":                         `line 3: socketmap.unix_socket_mode: must be an octal file mode such as "0660", not "0689"`,
	"bad_nameserver.yaml":                   `line 5: dns.nameservers[1]: "ns1.example.net" is not an IP address`,
	"bad_port.yaml":                         `line 2: listen[0]: port must be a number from 1 to 65535, not "84610"`,
	"bare_int_duration.yaml":                `line 4: fetch.timeout: 30 has no unit; write a duration such as "30s"`,
	"bool_yes.yaml":                         `line 4: maps.*.strict_testing: must be true or false, not "yes"`,
	"tlsrpt_yes.yaml":                       `line 6: maps.postfix310.tlsrpt: must be true or false, not "yes"`,
	"bad_socket_group.yaml":                 `line 3: socketmap.unix_socket_group: must be a user or group name or number, not "post fix"`,
	"bad_metrics_listen.yaml":               `line 2: metrics.listen: must be host:port or empty, not "9090"`,
	"relative_admin_socket.yaml":            `line 2: admin.socket: must be an absolute path, "none" or empty, not "admin.sock"`,
	"bad_dane.yaml":                         `line 2: dane: must be auto or off, not "maybe"`,
	"cache_size_zero.yaml":                  `line 3: cache.size: must be at least 1`,
	"dns_timeout_too_long.yaml":             `line 3: dns.timeout: must be at most 30s`,
	"duplicate_key.yaml":                    `line 5: dns.timeout: repeated; first set at line 3`,
	"duplicate_listen.yaml":                 `line 5: listen[2]: "127.0.0.1:8461" repeats listen[0]`,
	"empty_listen.yaml":                     `line 2: listen: at least one address`,
	"empty_map_name.yaml":                   `line 3: maps: a map name must not be empty`,
	"fetch_timeout_too_long.yaml":           `line 3: fetch.timeout: must be at most 5m0s`,
	"first_contact_gt_timeout.yaml":         `line 4: fetch.first_contact_timeout: must not be longer than fetch.timeout (10s)`,
	"float_int.yaml":                        `line 3: cache.size: must be a whole number, not "1.5"`,
	"int_overflow.yaml":                     `line 3: cache.size: 99999999999999999999999 is out of range`,
	"list_map_name.yaml":                    `line 3: maps: a map name must be a plain string`,
	"listen_not_list.yaml":                  `line 2: listen: must be a list`,
	"map_not_mapping.yaml":                  `line 3: maps.postfix: must be a mapping with the keys strict_testing, servername, tlsrpt`,
	"max_connections_zero.yaml":             `line 3: socketmap.max_connections: must be at least 1`,
	"max_request_size_large.yaml":           `line 3: socketmap.max_request_size: must be between 256 and 1048576 bytes, not 2000000`,
	"max_request_size_small.yaml":           `line 3: socketmap.max_request_size: must be between 256 and 1048576 bytes, not 100`,
	"missing_port.yaml":                     `line 4: listen[1]: "127.0.0.1" is neither "host:port" nor "unix:/path"`,
	"mode_too_large.yaml":                   `line 3: socketmap.unix_socket_mode: must be between 0000 and 0777, not 01777`,
	"named_port.yaml":                       `line 2: listen[0]: port must be a number from 1 to 65535, not "smtp"`,
	"nameserver_port_zero.yaml":             `line 3: dns.nameservers[0]: "[2001:db8::53]:0" is not an IP address`,
	"negative_timeout.yaml":                 `line 4: dns.timeout: must be greater than 0`,
	"negative_ttl_negative.yaml":            `line 3: cache.negative_ttl: must not be negative`,
	"not_mapping.yaml":                      `line 2: the file must be a mapping with the keys listen, socketmap, dns, fetch, cache, refresh, maps, dane, metrics, admin, log`,
	"null_list_item.yaml":                   `line 5: dns.nameservers[1]: has no value`,
	"null_listen.yaml":                      `line 2: listen: at least one address`,
	"null_map_name.yaml":                    `line 3: maps: a map name must not be null`,
	"null_value.yaml":                       `line 3: dns.timeout: has no value`,
	"quoted_int.yaml":                       `line 3: cache.size: must be a whole number, not the string "1000"`,
	"relative_unix.yaml":                    `line 4: listen[1]: unix socket path must be absolute`,
	"scalar_not_list.yaml":                  `line 3: cache.negative_ttl: must be a single value, not a list or mapping`,
	"section_not_mapping.yaml":              `line 2: dns: must be a mapping with the keys nameservers, timeout`,
	"symbolic_mode.yaml":                    `line 3: socketmap.unix_socket_mode: must be an octal file mode such as "0660", not "rw-rw----"`,
	"syntax_error.yaml":                     `line 3: invalid YAML: found character that cannot start any token`,
	"timeout_lt_default_first_contact.yaml": `line 3: fetch.first_contact_timeout: must not be longer than fetch.timeout (2s), not 5s`,
	"two_documents.yaml":                    `line 3: a second YAML document starts here`,
	"unknown_key.yaml":                      `line 3: unknown key "nameserver" in dns; known keys: nameservers, timeout`,
	"unknown_map_key.yaml":                  `line 5: unknown key "strict" in maps.postfix; known keys: strict_testing, servername, tlsrpt`,
	"unknown_top_key.yaml":                  `line 2: unknown key "listens"; known keys: listen, socketmap`,
	"wrong_type.yaml":                       `line 3: socketmap.max_connections: must be a whole number, not "lots"`,
	"zero_idle_timeout.yaml":                `line 3: socketmap.idle_timeout: must be greater than 0`,
	"tag_with_newline.yaml":                 `line 2: the file must be a mapping with the keys listen, socketmap`,
	"bad_store.yaml":                        `line 3: cache.store: must be bolt, redis or memory, not "sqlite"`,
	"relative_store_path.yaml":              `line 4: cache.path: must be an absolute path, not "var/lib/stsmap/policies.db"`,
	"redis_without_url.yaml":                `line 4: cache.redis_url: is required with cache.store: redis`,
	"redis_url_bad_scheme.yaml":             `line 4: cache.redis_url: has the scheme "http"; write redis://`,
	"redis_url_no_host.yaml":                `line 4: cache.redis_url: names no host`,
	"redis_url_unix_relative.yaml":          `line 4: cache.redis_url: must name an absolute socket path after unix://`,
	"redis_url_without_redis_store.yaml":    `line 4: cache.redis_url: is set, but cache.store is "memory"`,
	"empty_redis_prefix.yaml":               `line 3: cache.redis_prefix: must not be empty`,
	"redis_prefix_space.yaml":               `line 3: cache.redis_prefix: must be printable ASCII without spaces, not "sts map:"`,
	"refresh_interval_short.yaml":           `line 3: refresh.interval: must be at least 1m0s, not 30s`,
	"refresh_interval_long.yaml":            `line 3: refresh.interval: must be at most 24h0m0s, not 25h0m0s`,
	"negative_renew_before.yaml":            `line 3: refresh.renew_before: must not be negative`,
	"refresh_concurrency_zero.yaml":         `line 3: refresh.concurrency: must be between 1 and 256, not 0`,
	"refresh_concurrency_large.yaml":        `line 3: refresh.concurrency: must be between 1 and 256, not 257`,
	"idle_after_not_after_interval.yaml":    `line 5: refresh.idle_after: must be longer than refresh.interval (2h0m0s), not 2h0m0s`,
}

func TestRejected(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for name := range rejected {
		if !slices.Contains(files, filepath.Join("testdata", name)) {
			t.Errorf("rejected names testdata/%s, which does not exist", name)
		}
	}
	for _, file := range files {
		name := filepath.Base(file)
		t.Run(name, func(t *testing.T) {
			want, ok := rejected[name]
			if !ok {
				t.Fatalf("testdata/%s has no entry in rejected", name)
			}
			c, err := Load(file)
			if err == nil {
				t.Fatalf("Load(%s) = %+v, want an error containing %q", file, c, want)
			}
			if got, prefix := err.Error(), "config: "+file+": "; !strings.HasPrefix(got, prefix) {
				t.Errorf("Load(%s) error %q does not start with %q", file, got, prefix)
			}
			if got := err.Error(); !strings.Contains(got, want) {
				t.Errorf("Load(%s) error\n got %q\nwant it to contain %q", file, got, want)
			}
		})
	}
}

func TestSeveralErrors(t *testing.T) {
	input := `log: {level: loud}
dns:
  timeout: 0s
  nameserver: []
cache: {size: 0}
`
	_, err := Parse([]byte(input))
	if err == nil {
		t.Fatal("Parse: no error")
	}
	// Problems found while reading the file are reported together, in line
	// order. Range checks run only on a file that reads cleanly, so
	// dns.timeout and cache.size are not reported yet.
	want := `config: line 1: log.level: must be debug, info, warn or error, not "loud"
config: line 4: unknown key "nameserver" in dns; known keys: nameservers, timeout`
	if got := err.Error(); got != want {
		t.Errorf("Parse error\n got %q\nwant %q", got, want)
	}

	_, err = Parse([]byte("dns:\n  timeout: 0s\ncache: {size: 0}\n"))
	want = "config: line 2: dns.timeout: must be greater than 0\nconfig: line 3: cache.size: must be at least 1"
	if err == nil || err.Error() != want {
		t.Errorf("Parse error\n got %v\nwant %q", err, want)
	}
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsmap.yaml")
	_, err := Load(path)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want fs.ErrNotExist", err)
	}
	if err != nil && !strings.Contains(err.Error(), path) {
		t.Errorf("Load(missing) error %q does not name %s", err, path)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		change func(c *Config)
		want   string // "" for valid
	}{
		{"default", func(c *Config) {}, ""},
		{"no listen", func(c *Config) { c.Listen = nil }, "config: listen: at least one address"},
		{"bare nameserver", func(c *Config) { c.DNS.Nameservers = []string{"192.0.2.53"} }, `config: dns.nameservers[0]: "192.0.2.53" is not an IP address`},
		{"setgid mode", func(c *Config) { c.Socketmap.UnixSocketMode = fs.ModeSetgid | 0o660 }, "config: socketmap.unix_socket_mode: must be between 0000 and 0777"},
		{"odd log level", func(c *Config) { c.Log.Level = slog.LevelInfo + 2 }, "config: log.level: must be debug, info, warn or error, not INFO+2"},
		{"map name with tab", func(c *Config) { c.Maps["a\tb"] = MapConfig{} }, `config: maps: map name "a\tb" must not contain white space`},
		{"zero first contact", func(c *Config) { c.Fetch.FirstContactTimeout = 0 }, "config: fetch.first_contact_timeout: must be greater than 0"},
		{"no star map", func(c *Config) { c.Maps = nil }, ""},
		{"store redis", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "redis://localhost/0" }, ""},
		{"store in capitals", func(c *Config) { c.Cache.Store = "Bolt" }, `config: cache.store: must be bolt, redis or memory, not "Bolt"`},
		{"redis_url with store bolt", func(c *Config) { c.Cache.RedisURL = "redis://localhost/0" }, `config: cache.redis_url: is set, but cache.store is "bolt"`},
		{"redis_url not a URL", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "127.0.0.1:6379" }, "config: cache.redis_url: is not a valid URL"},
		{"redis_url with two paths", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "redis://localhost/0/1" }, "config: cache.redis_url: may end only in a database number"},
		{"redis_url unix opaque", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "unix:run/redis.sock" }, "config: cache.redis_url: must have the form redis://"},
		{"redis_url unix with one slash", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "unix:/run/redis.sock" }, ""},
		{"redis_url with db 15 and trailing slash", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "redis://localhost/15/" }, ""},
		{"redis_url without scheme", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "localhost:6379" }, "config: cache.redis_url: must have the form redis://"},
		{"redis_url port 0", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "redis://localhost:0" }, "config: cache.redis_url: has a port out of range"},
		{"redis_url db name", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "redis://localhost/policies" }, "config: cache.redis_url: may end only in a database number"},
		{"redis_url unix without path", func(c *Config) { c.Cache.Store, c.Cache.RedisURL = "redis", "unix://" }, "config: cache.redis_url: must name an absolute socket path"},
		{"redis_prefix too long", func(c *Config) { c.Cache.RedisPrefix = strings.Repeat("k", 65) }, "config: cache.redis_prefix: must be at most 64 bytes, not 65"},
		{"redis_prefix not ASCII", func(c *Config) { c.Cache.RedisPrefix = "stsmäp:" }, `config: cache.redis_prefix: must be printable ASCII without spaces, not "stsmäp:"`},
		{"redis_prefix with a newline", func(c *Config) { c.Cache.RedisPrefix = "sts\n" }, `config: cache.redis_prefix: must be printable ASCII without spaces, not "sts\n"`},
		{"renew_before too long", func(c *Config) { c.Refresh.RenewBefore = 721 * time.Hour }, "config: refresh.renew_before: must be at most 720h0m0s, not 721h0m0s"},
		{"idle_after too short", func(c *Config) { c.Refresh.IdleAfter = 59 * time.Minute }, "config: refresh.idle_after: must be at least 1h0m0s, not 59m0s"},
		{"idle_after shorter than interval", func(c *Config) { c.Refresh.Interval, c.Refresh.IdleAfter = 3*time.Hour, 2*time.Hour }, "config: refresh.idle_after: must be longer than refresh.interval (3h0m0s), not 2h0m0s"},
		{"unix socket", func(c *Config) { c.Listen = []string{"unix:/run/stsmap.sock"} }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.change(c)
			err := c.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("Validate() = %v, want an error containing %q", err, tt.want)
			}
		})
	}

	err := (&Config{}).Validate()
	if err == nil {
		t.Fatal("Config{}.Validate() = nil, want errors")
	}
	lines := strings.Split(err.Error(), "\n")
	for _, want := range []string{"listen:", "max_connections:", "dns.timeout:", "fetch.timeout:", "cache.size:", "cache.store:", "cache.redis_prefix:",
		"refresh.interval:", "refresh.concurrency:", "refresh.idle_after:", "log.format:"} {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, want) }) {
			t.Errorf("Config{}.Validate() = %q, want a line about %s", err, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.yaml")
	seeds = append(seeds, "../config.example.yaml")
	for _, file := range seeds {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("cache: {store: redis, redis_url: \"rediss://u:p@[::1]:6380/2\", redis_prefix: a}\nrefresh: {interval: 5m, idle_after: 1h}\n"))
	f.Add([]byte("cache: {store: redis, redis_url: \"unix:///run/redis.sock\"}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Errorf("Parse returned a Config and the error %v", err)
			}
			for line := range strings.SplitSeq(err.Error(), "\n") {
				if !strings.HasPrefix(line, "config: ") {
					t.Errorf("error line %q lacks the config: prefix", line)
				}
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Errorf("Parse accepted a Config that fails Validate: %v", err)
		}
		c.MapSettings("postfix")
		if p, err := c.StorePath(); err == nil && !filepath.IsAbs(p) {
			t.Errorf("StorePath() = %q, want an absolute path", p)
		}
	})
}

func BenchmarkMapSettings(b *testing.B) {
	c, err := Parse([]byte("maps:\n  postfix: {strict_testing: true}\n  other: {servername: false}\n"))
	if err != nil {
		b.Fatal(err)
	}
	names := []string{"postfix", "unknown", "*"}
	b.ReportAllocs()
	var s MapSettings
	for i := 0; b.Loop(); i++ {
		s = c.MapSettings(names[i%len(names)])
	}
	_ = s
}

func TestErrorsAreBounded(t *testing.T) {
	var b strings.Builder
	for i := range maxErrors + 5 {
		fmt.Fprintf(&b, "key%d: 1\n", i)
	}
	_, err := Parse([]byte(b.String()))
	if err == nil {
		t.Fatal("Parse: no error")
	}
	lines := strings.Split(err.Error(), "\n")
	if got, want := len(lines), maxErrors+1; got != want {
		t.Errorf("error has %d lines, want %d", got, want)
	}
	if got, want := lines[len(lines)-1], "config: and 5 more problems"; got != want {
		t.Errorf("last line = %q, want %q", got, want)
	}
}

func TestEscapeControl(t *testing.T) {
	for in, want := range map[string]string{
		"cannot unmarshal !\n``": `cannot unmarshal !\n` + "``",
		"tab\there, NUL\x00":     `tab\there, NUL\x00`,
		"plain é":                "plain é",
	} {
		if got := escapeControl(in); got != want {
			t.Errorf("escapeControl(%q) = %q, want %q", in, got, want)
		}
	}
}

// A Redis URL may hold a password; no message may show it.
func TestRedisURLErrorsHidePassword(t *testing.T) {
	for _, u := range []string{
		"http://stsmap:s3cret@redis.example.net/0",
		"redis://stsmap:s3cret@/0",
		"redis://stsmap:s3cret@redis.example.net:99999/0",
		"redis://stsmap:s3cret@redis.example.net/zero",
		"redis://stsmap:s3cret@redis.example.net:port/0",
		"redis://stsmap:s3cret@redis example.net/0",
		"redis://stsmap:s3cret%zz@redis.example.net/0",
		"unix://stsmap:s3cret@run/redis.sock",
		"stsmap:s3cret@redis.example.net",
		"redis://stsmap:s3cret\x7f@redis.example.net",
		"redis://stsmap:12/34@redis.example.net/0",
		"redis://stsmap:99999/0@redis.example.net",
		"s3cret:/x@redis.example.net",
	} {
		c := Default()
		c.Cache.Store, c.Cache.RedisURL = "redis", u
		err := c.Validate()
		if err == nil {
			t.Errorf("Validate() with redis_url %q = nil, want an error", u)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Validate() with redis_url %q = %q, which shows the password", u, err)
		}
	}
}

// fakeRoot makes StorePath see stsmap running as root, or not.
func fakeRoot(t *testing.T, root bool) {
	t.Helper()
	saved := isRoot
	isRoot = func() bool { return root }
	t.Cleanup(func() { isRoot = saved })
}

func TestStorePath(t *testing.T) {
	tests := []struct {
		name string
		path string            // cache.path
		env  map[string]string // of STATE_DIRECTORY, XDG_STATE_HOME, HOME; the others are empty
		root bool
		want string // "" for an error
	}{
		{"cache.path", "/srv/policies.db", map[string]string{"STATE_DIRECTORY": "/var/lib/stsmap", "HOME": "/root"}, true, "/srv/policies.db"},
		{"STATE_DIRECTORY", "", map[string]string{"STATE_DIRECTORY": "/var/lib/stsmap", "XDG_STATE_HOME": "/home/u/.state"}, false, "/var/lib/stsmap/policies.db"},
		{"STATE_DIRECTORY of two", "", map[string]string{"STATE_DIRECTORY": "/var/lib/mta-sts:/var/lib/other", "HOME": "/home/u"}, false, "/var/lib/mta-sts/policies.db"},
		{"STATE_DIRECTORY before root", "", map[string]string{"STATE_DIRECTORY": "/var/lib/private/stsmap"}, true, "/var/lib/private/stsmap/policies.db"},
		{"relative STATE_DIRECTORY is ignored", "", map[string]string{"STATE_DIRECTORY": "stsmap", "HOME": "/home/u"}, false, "/home/u/.local/state/stsmap/policies.db"},
		{"root", "", map[string]string{"XDG_STATE_HOME": "/root/.state", "HOME": "/root"}, true, "/var/lib/stsmap/policies.db"},
		{"root without environment", "", nil, true, "/var/lib/stsmap/policies.db"},
		{"XDG_STATE_HOME", "", map[string]string{"XDG_STATE_HOME": "/home/u/.state", "HOME": "/home/u"}, false, "/home/u/.state/stsmap/policies.db"},
		{"relative XDG_STATE_HOME is ignored", "", map[string]string{"XDG_STATE_HOME": ".state", "HOME": "/home/u"}, false, "/home/u/.local/state/stsmap/policies.db"},
		{"HOME", "", map[string]string{"HOME": "/home/u"}, false, "/home/u/.local/state/stsmap/policies.db"},
		{"no HOME", "", nil, false, ""},
		{"relative HOME", "", map[string]string{"HOME": "home/u"}, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, k := range []string{"STATE_DIRECTORY", "XDG_STATE_HOME", "HOME"} {
				t.Setenv(k, tt.env[k])
			}
			fakeRoot(t, tt.root)
			c := Default()
			c.Cache.Path = tt.path
			got, err := c.StorePath()
			switch {
			case tt.want == "" && err == nil:
				t.Errorf("StorePath() = %q, want an error", got)
			case tt.want == "" && !strings.Contains(err.Error(), "config: cache.path: "):
				t.Errorf("StorePath() error %q does not name cache.path", err)
			case tt.want != "" && (err != nil || got != tt.want):
				t.Errorf("StorePath() = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
