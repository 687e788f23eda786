/* A GA/T 947.4-style vendor library emulating one docked body-worn recorder, for tests.
 *
 * It exports the calls the agent's drivers/gat947.py makes (names as in common vendor SDKs), each returning
 * 1 on success and 0 on failure with the vendor's error code in *iRet:
 *   int Init_Device(char *IDCode, int *iRet)                          ID code (maker/model) into IDCode
 *   int GetIDCode(char *IDCode, int *iRet)
 *   int GetZFYInfo(ZFYINFO *info, char *sPwd, int *iRet)               serial, officer, unit
 *   int SetMSDC(char *sPwd, int *iRet)                                 switch to USB mass storage
 *   int ReadDeviceBatteryDumpEnergy(int *Battery, char *sPwd, int *iRet)
 *   int ReadDeviceTime(char *Time, char *sPwd, int *iRet)              "YYYYMMDDhhmmss", the recorder's local time
 *   int SyncDevTime(char *sPwd, int *iRet)                             set the recorder's clock to the host's
 * Every call taking sPwd refuses a wrong password (error 2), as recorders do.
 *
 * What the emulated recorder holds is set and read by the test through Stub_Set / Stub_Get (same process,
 * same dlopen handle): offset_s (its clock minus the host's), battery, password, id_code, serial, user_no,
 * user_name, unit_no, unit_name (raw bytes: GBK for Chinese), utc_offset_s (its time zone), fail (the name of
 * one call that fails with error 9); Stub_Get reads msdc (1 once switched), offset_s, and calls (the names
 * called, in order, comma-separated).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    char cSerial[8];
    char userNo[10];
    char userName[32];
    char unitNo[16];
    char unitName[64];
} ZFYINFO;

static long offset_s = 0, utc_offset_s = 8 * 3600;
static int battery = 80, msdc = 0;
static char password[64] = "000000", id_code[64] = "ZFY01", fail[64] = "";
static char serial[64] = "", user_no[64] = "", user_name[64] = "", unit_no[64] = "", unit_name[64] = "";
static char calls[4096] = "";

static void copy(char *dst, size_t size, const char *src) {
    strncpy(dst, src, size - 1);
    dst[size - 1] = '\0';
}

static int called(const char *name, int *iRet) {
    if (strlen(calls) + strlen(name) + 2 < sizeof calls) {
        if (calls[0]) strcat(calls, ",");
        strcat(calls, name);
    }
    if (strcmp(fail, name) == 0) {
        *iRet = 9;
        return 0;
    }
    *iRet = 0;
    return 1;
}

static int checked(const char *name, const char *pwd, int *iRet) {
    if (!called(name, iRet)) return 0;
    if (pwd == NULL || strcmp(pwd, password) != 0) {
        *iRet = 2;
        return 0;
    }
    return 1;
}

void Stub_Set(const char *key, const char *value) {
    if (!strcmp(key, "offset_s")) offset_s = atol(value);
    else if (!strcmp(key, "utc_offset_s")) utc_offset_s = atol(value);
    else if (!strcmp(key, "battery")) battery = atoi(value);
    else if (!strcmp(key, "password")) copy(password, sizeof password, value);
    else if (!strcmp(key, "id_code")) copy(id_code, sizeof id_code, value);
    else if (!strcmp(key, "serial")) copy(serial, sizeof serial, value);
    else if (!strcmp(key, "user_no")) copy(user_no, sizeof user_no, value);
    else if (!strcmp(key, "user_name")) copy(user_name, sizeof user_name, value);
    else if (!strcmp(key, "unit_no")) copy(unit_no, sizeof unit_no, value);
    else if (!strcmp(key, "unit_name")) copy(unit_name, sizeof unit_name, value);
    else if (!strcmp(key, "fail")) copy(fail, sizeof fail, value);
    else if (!strcmp(key, "reset")) { msdc = 0; calls[0] = '\0'; }
}

int Stub_Get(const char *key, char *out, int size) {
    if (!strcmp(key, "msdc")) return snprintf(out, size, "%d", msdc);
    if (!strcmp(key, "offset_s")) return snprintf(out, size, "%ld", offset_s);
    if (!strcmp(key, "calls")) return snprintf(out, size, "%s", calls);
    return -1;
}

int Init_Device(char *IDCode, int *iRet) {
    if (!called("Init_Device", iRet)) return 0;
    strcpy(IDCode, id_code);
    return 1;
}

int GetIDCode(char *IDCode, int *iRet) {
    if (!called("GetIDCode", iRet)) return 0;
    strcpy(IDCode, id_code);
    return 1;
}

int GetZFYInfo(ZFYINFO *info, char *sPwd, int *iRet) {
    if (!checked("GetZFYInfo", sPwd, iRet)) return 0;
    memset(info, 0, sizeof *info);
    /* fixed-width fields, not necessarily NUL-terminated when full (as vendors fill them) */
    memcpy(info->cSerial, serial, strnlen(serial, sizeof info->cSerial));
    memcpy(info->userNo, user_no, strnlen(user_no, sizeof info->userNo));
    memcpy(info->userName, user_name, strnlen(user_name, sizeof info->userName));
    memcpy(info->unitNo, unit_no, strnlen(unit_no, sizeof info->unitNo));
    memcpy(info->unitName, unit_name, strnlen(unit_name, sizeof info->unitName));
    return 1;
}

int SetMSDC(char *sPwd, int *iRet) {
    if (!checked("SetMSDC", sPwd, iRet)) return 0;
    msdc = 1;
    return 1;
}

int ReadDeviceBatteryDumpEnergy(int *Battery, char *sPwd, int *iRet) {
    if (!checked("ReadDeviceBatteryDumpEnergy", sPwd, iRet)) return 0;
    *Battery = battery;
    return 1;
}

int ReadDeviceTime(char *Time, char *sPwd, int *iRet) {
    if (!checked("ReadDeviceTime", sPwd, iRet)) return 0;
    time_t t = time(NULL) + offset_s + utc_offset_s;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(Time, 15, "%Y%m%d%H%M%S", &tm);
    return 1;
}

int SyncDevTime(char *sPwd, int *iRet) {
    if (!checked("SyncDevTime", sPwd, iRet)) return 0;
    offset_s = 0;
    return 1;
}
