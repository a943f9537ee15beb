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

func TestEmptyIsDefault(t *testing.T) {
	for _, input := range []string{
		"",
		"\n\n",
		"# only a comment\n",
		"---\n",
		"--- # one document\n...\n",
		"~\n",
		"socketmap:\ndns:\nfetch:\ncache:\nmaps:\nlog:\n", // empty sections
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
		{"star map", `maps: {"*": {strict_testing: true}}`, func(c *Config) {
			c.Maps["*"] = MapConfig{StrictTesting: new(true), Servername: new(true)}
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
	if got, want := c.Cache, (CacheConfig{Size: 7, NegativeTTL: time.Minute}); got != want {
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
			"*":       {StrictTesting: false, Servername: true},
			"postfix": {StrictTesting: false, Servername: true},
			"":        {StrictTesting: false, Servername: true},
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
	"map_not_mapping.yaml":                  `line 3: maps.postfix: must be a mapping with the keys strict_testing, servername`,
	"max_connections_zero.yaml":             `line 3: socketmap.max_connections: must be at least 1`,
	"max_request_size_large.yaml":           `line 3: socketmap.max_request_size: must be between 256 and 1048576 bytes, not 2000000`,
	"max_request_size_small.yaml":           `line 3: socketmap.max_request_size: must be between 256 and 1048576 bytes, not 100`,
	"missing_port.yaml":                     `line 4: listen[1]: "127.0.0.1" is neither "host:port" nor "unix:/path"`,
	"mode_too_large.yaml":                   `line 3: socketmap.unix_socket_mode: must be between 0000 and 0777, not 01777`,
	"named_port.yaml":                       `line 2: listen[0]: port must be a number from 1 to 65535, not "smtp"`,
	"nameserver_port_zero.yaml":             `line 3: dns.nameservers[0]: "[2001:db8::53]:0" is not an IP address`,
	"negative_timeout.yaml":                 `line 4: dns.timeout: must be greater than 0`,
	"negative_ttl_negative.yaml":            `line 3: cache.negative_ttl: must not be negative`,
	"not_mapping.yaml":                      `line 2: the file must be a mapping with the keys listen, socketmap, dns, fetch, cache, maps, log`,
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
	"unknown_map_key.yaml":                  `line 5: unknown key "strict" in maps.postfix; known keys: strict_testing, servername`,
	"unknown_top_key.yaml":                  `line 2: unknown key "listens"; known keys: listen, socketmap`,
	"wrong_type.yaml":                       `line 3: socketmap.max_connections: must be a whole number, not "lots"`,
	"zero_idle_timeout.yaml":                `line 3: socketmap.idle_timeout: must be greater than 0`,
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
	for _, want := range []string{"listen:", "max_connections:", "dns.timeout:", "fetch.timeout:", "cache.size:", "log.format:"} {
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
